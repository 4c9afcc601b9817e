"""Small private state files, replaced whole: a crash leaves the old file or the new one.

Votes, fences and deployment tables are each rewritten as one file: written to a sibling
`.tmp` readable by the owner only (0600), fsynced, then renamed over the old one.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_private(path: Path, data: bytes) -> None:
    """Make `path` hold exactly `data`, durably, mode 0600, never half written."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
