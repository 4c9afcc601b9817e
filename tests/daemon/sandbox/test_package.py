"""Policy packages: the format (directory, tar, zip), the content hash, the manifest, the
allow-list, and the worker-side loader (import from checked bytes, the import guard)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from daemon.sandbox import loader
from daemon.sandbox.errors import DependencyRefused, PolicyInvalid
from daemon.sandbox.package import (
    MAX_FILES,
    MAX_PACKAGE_BYTES,
    check_package,
    content_digest,
    load_package,
    read_files,
)
from tests.daemon.sandbox.policies import make_policy


def tar_of(folder: Path, target: Path, top: str = "policy") -> Path:
    with tarfile.open(target, "w:gz") as archive:
        archive.add(folder, arcname=top)
    return target


def zip_of(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return target


def test_directory_tar_and_zip_have_the_same_hash(tmp_path: Path) -> None:
    folder = make_policy(tmp_path / "p", extra={"data/table.json": "[1, 2]"})
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "function.cpython-311.pyc").write_bytes(b"derived")
    packages = [
        load_package(folder),
        load_package(tar_of(folder, tmp_path / "p.tar.gz")),
        load_package(zip_of(folder, tmp_path / "p.zip")),
    ]
    digests = {p.digest for p in packages}
    assert len(digests) == 1 and packages[0].digest.startswith("sha256:")
    assert set(packages[0].files) == {"function.py", "manifest.json", "data/table.json"}
    assert packages[0].manifest.name == "test-policy"
    assert packages[0].manifest.entry == "function:AIOSv1PolicyRule"


def test_a_policy_changed_under_its_hash_is_refused(tmp_path: Path) -> None:
    folder = make_policy(tmp_path / "p")
    digest = load_package(folder).digest
    assert load_package(folder, expected_digest=digest).digest == digest
    (folder / "function.py").write_text((folder / "function.py").read_text() + "\n# changed\n")
    with pytest.raises(
        PolicyInvalid, match="changed: its content hash is sha256:.*not the expected"
    ):
        load_package(folder, expected_digest=digest)
    (folder / "new.py").write_text("x = 1\n")  # an added file changes the hash too
    assert load_package(folder).digest != digest


def test_every_byte_and_name_counts_in_the_hash() -> None:
    base = {"a.py": b"x", "manifest.json": b"{}"}
    assert content_digest(base) != content_digest({**base, "a.py": b"y"})
    assert content_digest(base) != content_digest({"b.py": b"x", "manifest.json": b"{}"})
    # no ambiguity between a name's end and the data's start
    assert content_digest({"ab": b"c"}) != content_digest({"a": b"bc"})


def test_requirements_must_be_on_the_allow_list(tmp_path: Path) -> None:
    folder = make_policy(tmp_path / "p", requirements=("numpy", "requests"))
    with pytest.raises(DependencyRefused, match="requires requests, not on this node's allow-list"):
        load_package(folder, allowed=("numpy",))
    assert load_package(folder, allowed=("numpy", "requests")).manifest.requirements == (
        "numpy",
        "requests",
    )


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        ({"name": "x", "extra": 1}, "unknown field `extra`"),
        ({"name": ""}, "name"),
        ({"name": "x", "entry": "function"}, "entry"),
        ({"name": "x", "entry": "missing:Rule"}, "entry module 'missing'"),
        ({"name": "x", "requirements": ["not a name"]}, "requirements"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, manifest: dict, match: str) -> None:
    folder = make_policy(tmp_path / "p")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PolicyInvalid, match=match):
        load_package(folder)


def test_missing_manifest_and_bad_json(tmp_path: Path) -> None:
    folder = make_policy(tmp_path / "p")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(PolicyInvalid, match="not valid JSON"):
        load_package(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(PolicyInvalid, match="has no manifest.json"):
        load_package(folder)
    with pytest.raises(PolicyInvalid, match="does not exist"):
        load_package(tmp_path / "nothing")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(PolicyInvalid, match="neither a directory nor a tar or zip"):
        load_package(tmp_path / "plain.txt")


def test_links_and_escaping_paths_are_refused(tmp_path: Path) -> None:
    folder = make_policy(tmp_path / "p")
    os.symlink("/etc/passwd", folder / "passwd")
    with pytest.raises(PolicyInvalid, match="symbolic link"):
        load_package(folder)
    for name in ("../evil.py", "/abs.py", "a/../../b.py"):
        target = tmp_path / f"bad{abs(hash(name))}.tar"
        with tarfile.open(target, "w") as archive:
            info = tarfile.TarInfo(name)
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(PolicyInvalid, match="leaves the package"):
            read_files(target)
    linked = tmp_path / "link.tar"
    with tarfile.open(linked, "w") as archive:
        info = tarfile.TarInfo("function.py")
        info.type = tarfile.SYMTYPE
        info.linkname = "/root/.gridmesh/node.key"
        archive.addfile(info)
    with pytest.raises(PolicyInvalid, match="not a plain file"):
        read_files(linked)


def test_size_bounds(tmp_path: Path) -> None:
    many = make_policy(tmp_path / "many")
    for index in range(MAX_FILES):
        (many / f"m{index}.txt").write_text("x")
    with pytest.raises(PolicyInvalid, match=f"more than {MAX_FILES} files"):
        load_package(many)
    big = make_policy(tmp_path / "big")
    (big / "blob.bin").write_bytes(b"\0" * (MAX_PACKAGE_BYTES + 1))
    with pytest.raises(PolicyInvalid, match=f"over {MAX_PACKAGE_BYTES} bytes"):
        load_package(big)


@pytest.fixture
def clean_imports():
    """The loader installs an import guard and policy modules: take them away again."""
    meta, modules = list(sys.meta_path), set(sys.modules)
    yield
    sys.meta_path[:] = meta
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def test_loader_imports_from_the_checked_bytes(tmp_path: Path, clean_imports: None) -> None:
    folder = make_policy(
        tmp_path / "p",
        "from helpers.util import double\nreturn double(input_data)",
        extra={"helpers/__init__.py": "", "helpers/util.py": "def double(x):\n    return 2 * x\n"},
        name="loader-test",
    )
    package = load_package(folder)
    loaded = loader.load(package.files, package.digest, allowed=(), root=tmp_path / "scratch")
    policy = loaded.instance("k", "rule", {}, {})
    assert policy.eval({}, 21, {}) == 42
    assert policy.management("reset", None) == {"action": "reset", "data": None, "count": 1}
    assert loaded.instance("k", "rule", {}, {}) is policy  # made once per key
    # written to scratch so that a policy reads its own data files through __file__
    assert (tmp_path / "scratch" / "helpers" / "util.py").read_bytes() == package.files[
        "helpers/util.py"
    ]


def test_loader_refuses_bytes_that_are_not_the_hash(tmp_path: Path, clean_imports: None) -> None:
    package = load_package(make_policy(tmp_path / "p", name="tampered"))
    files = {**package.files, "function.py": package.files["function.py"] + b"\nimport os\n"}
    with pytest.raises(PolicyInvalid, match="content hash"):
        loader.load(files, package.digest, allowed=(), root=tmp_path / "s")


def test_import_guard(tmp_path: Path, clean_imports: None) -> None:
    body = "import importlib\nreturn importlib.import_module(input_data).__name__"
    package = load_package(
        make_policy(tmp_path / "p", body, name="guard", requirements=("msgpack",)),
        allowed=("msgpack",),
    )
    loaded = loader.load(package.files, package.digest, allowed=("msgpack",), root=tmp_path / "s")
    policy = loaded.instance("k", "r", {}, {})
    assert policy.eval({}, "json", {}) == "json"  # the standard library
    assert policy.eval({}, "msgpack", {}) == "msgpack"  # required and allowed
    with pytest.raises(ModuleNotFoundError, match="import of 'some_uninstalled_pkg' refused"):
        policy.eval({}, "some_uninstalled_pkg", {})
    # the daemon's own packages are not the policy's either (in a worker they are not loaded)
    sys.modules.pop("hypothesis_not_loaded", None)
    with pytest.raises(ModuleNotFoundError, match="refused"):
        policy.eval({}, "hypothesis_not_loaded.x", {})


def test_check_package_on_missing_entry_class(tmp_path: Path, clean_imports: None) -> None:
    folder = make_policy(tmp_path / "p", name="noclass")
    (folder / "manifest.json").write_text(json.dumps({"name": "noclass", "entry": "function:Nope"}))
    package = load_package(folder)
    check_package(package.files, expected_digest=package.digest)
    with pytest.raises(PolicyInvalid, match="has no class Nope"):
        loader.load(package.files, package.digest, allowed=(), root=tmp_path / "s")
