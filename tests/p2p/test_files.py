"""p2p.files.replace_private: the whole new content, owner-only, no temporary left behind."""

from __future__ import annotations

import os
import stat

from p2p import files


def test_replace_private_writes_all_of_it_owner_only_and_replaces(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    big = os.urandom(3 << 20)  # larger than one write may take
    files.replace_private(path, big)
    assert path.read_bytes() == big
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    files.replace_private(path, b"{}")
    assert path.read_bytes() == b"{}"
