"""A policy package: a directory or an archive (tar, tar.gz, zip) holding the policy's code
and `manifest.json`, identified by the hash of its content.

The daemon only *reads* a package here — it never imports or runs its code. The files travel
to a sandbox worker as bytes; the worker checks the hash again over what it received and
imports the code from those bytes (daemon.sandbox.loader), so a policy that changed between
being checked and being run is refused, not run.

Manifest (JSON, unknown keys refused):
    {"name": "least-loaded", "version": "1.0",
     "entry": "function:AIOSv1PolicyRule",      # module:Class (AIOS's default)
     "requirements": ["numpy"],                   # top-level import names, each on the
     "description": "...",                        # operator's allow-list
     "stateful": false}                           # true: one worker only (its state is one)

Content hash: "sha256:" + hex of SHA-256 over every file, in path order, each as its path's
length (4 bytes), its path (UTF-8, "/"-separated, relative to the package root), its length
(8 bytes) and its bytes. `__pycache__` folders and `*.pyc` files are left out (derived, and
never sent). An archive whose files all sit in one top folder is read as that folder, so a
directory and its archive have the same hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import msgspec

from daemon.sandbox.errors import DependencyRefused, PolicyInvalid

MANIFEST = "manifest.json"
MAX_FILES = 256
MAX_PACKAGE_BYTES = 4 << 20
MAX_PATH_CHARS = 255
IMPORT_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
ImportName = Annotated[str, msgspec.Meta(pattern=IMPORT_NAME)]


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """manifest.json of a policy package."""

    name: Name
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "0"
    entry: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
        ),
    ] = "function:AIOSv1PolicyRule"
    requirements: Annotated[tuple[ImportName, ...], msgspec.Meta(max_length=32)] = ()
    description: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    # keeps state between calls (a quota's buckets): the pool runs it in one worker only
    stateful: bool = False

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    @property
    def class_name(self) -> str:
        return self.entry.partition(":")[2]


@dataclasses.dataclass(frozen=True, eq=False)
class PolicyPackage:
    """A checked package: its manifest, its files (path -> bytes) and their hash. `trusted`
    is for policies that ship with gridmesh (set only by our own code, never from a spec):
    an untrusted one runs only where an isolation layer is active."""

    manifest: Manifest
    files: Mapping[str, bytes]
    digest: str
    source: str = ""
    trusted: bool = False

    def bind(
        self,
        rule_id: str = "",
        settings: Mapping[str, Any] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> PolicyRef:
        """This policy with the arguments its class is made with (AIOS:
        `AIOSv1PolicyRule(rule_id, settings, parameters)`)."""
        return PolicyRef(
            self, rule_id or self.manifest.name, dict(settings or {}), dict(parameters or {})
        )


@dataclasses.dataclass(frozen=True, eq=False)
class PolicyRef:
    """One instance of a policy: a package and its constructor's arguments. A worker makes
    the instance once and keeps it for the calls that follow."""

    package: PolicyPackage
    rule_id: str
    settings: dict[str, Any]
    parameters: dict[str, Any]


def content_digest(files: Mapping[str, bytes]) -> str:
    """The package's content hash (the module docstring says what it covers)."""
    sha = hashlib.sha256()
    for path in sorted(files):
        name = path.encode()
        sha.update(struct.pack(">I", len(name)) + name)
        sha.update(struct.pack(">Q", len(files[path])) + files[path])
    return "sha256:" + sha.hexdigest()


def _skipped(path: str) -> bool:
    parts = path.split("/")
    return "__pycache__" in parts or path.endswith(".pyc")


def check_path(path: str) -> str:
    """`path` if it is a safe relative file path inside a package; PolicyInvalid if not."""
    if not path or len(path) > MAX_PATH_CHARS or "\\" in path or "\0" in path:
        raise PolicyInvalid(f"file name {path[:80]!r} is not allowed in a policy package")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise PolicyInvalid(f"file name {path[:80]!r} leaves the package (absolute or ..)")
    return path


class _Budget:
    """Counts files and bytes as a package is read; PolicyInvalid past the bounds."""

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0

    def take(self, path: str, size: int) -> None:
        self.files += 1
        self.bytes += size
        if self.files > MAX_FILES:
            raise PolicyInvalid(f"the package has more than {MAX_FILES} files")
        if self.bytes > MAX_PACKAGE_BYTES:
            raise PolicyInvalid(f"the package is over {MAX_PACKAGE_BYTES} bytes (at {path[:80]!r})")


def _read_directory(root: Path) -> Iterator[tuple[str, bytes]]:
    budget = _Budget()
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in [*dirs, *names]:
            full = Path(folder) / name
            info = full.lstat()
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                raise PolicyInvalid(f"{rel} is a symbolic link: packages hold plain files only")
            if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
                raise PolicyInvalid(f"{rel} is not a plain file")
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            rel = check_path((Path(folder) / name).relative_to(root).as_posix())
            if _skipped(rel):
                continue
            budget.take(rel, (Path(folder) / name).stat().st_size)
            yield rel, (Path(folder) / name).read_bytes()


def _read_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    budget = _Budget()
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            if member.isdir():
                continue
            if not member.isreg():
                raise PolicyInvalid(f"{name[:80]!r} in the archive is not a plain file")
            check_path(name)
            if _skipped(name):
                continue
            budget.take(name, member.size)
            handle = archive.extractfile(member)
            assert handle is not None  # a regular member always has one
            yield name, handle.read(member.size + 1)[: member.size]


def _read_zip(path: Path) -> Iterator[tuple[str, bytes]]:
    budget = _Budget()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PolicyInvalid(f"{info.filename[:80]!r} in the archive is a symbolic link")
            name = check_path(info.filename)
            if _skipped(name):
                continue
            budget.take(name, info.file_size)
            with archive.open(info) as handle:
                data = handle.read(info.file_size + 1)
            if len(data) != info.file_size:
                raise PolicyInvalid(f"{name[:80]!r}: its size in the archive is wrong")
            yield name, data


def read_files(path: Path) -> dict[str, bytes]:
    """The files of the package at `path` (a directory or an archive), bounded and checked."""
    try:
        if not path.exists():
            raise PolicyInvalid(f"{path} does not exist")
        if path.is_dir():
            items: Iterable[tuple[str, bytes]] = _read_directory(path)
        elif zipfile.is_zipfile(path):
            items = _read_zip(path)
        elif tarfile.is_tarfile(path):
            items = _read_tar(path)
        else:
            raise PolicyInvalid(f"{path} is neither a directory nor a tar or zip archive")
        files: dict[str, bytes] = {}
        for name, data in items:
            if name in files:
                raise PolicyInvalid(f"{name[:80]!r} appears twice in the package")
            files[name] = data
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise PolicyInvalid(f"cannot read policy package {path}: {exc}") from None
    return _strip_top_folder(files)


def _strip_top_folder(files: dict[str, bytes]) -> dict[str, bytes]:
    if MANIFEST in files or not files:
        return files
    tops = {name.split("/", 1)[0] for name in files}
    if len(tops) == 1 and all("/" in name for name in files):
        (top,) = tops
        return {name[len(top) + 1 :]: data for name, data in files.items()}
    return files


# made at import: it resolves Manifest's types then (a worker forgets this module later)
_MANIFEST_DECODER = msgspec.json.Decoder(Manifest)


def parse_manifest(data: bytes) -> Manifest:
    try:
        return _MANIFEST_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise PolicyInvalid(f"{MANIFEST}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise PolicyInvalid(f"{MANIFEST} is not valid JSON: {exc}") from None


def module_names(files: Iterable[str]) -> set[str]:
    """The top-level modules and packages a package's files provide."""
    names = set()
    for path in files:
        top, _, rest = path.partition("/")
        if rest and rest.endswith(".py"):
            names.add(top)
        elif not rest and top.endswith(".py"):
            names.add(top[:-3])
    return names


def check_package(
    files: Mapping[str, bytes],
    *,
    expected_digest: str | None = None,
    allowed: Iterable[str] = (),
    source: str = "",
) -> tuple[Manifest, str]:
    """The manifest and hash of `files`, or the reason they cannot be used: not the
    expected hash, no or a bad manifest, no entry module, a requirement not allowed."""
    digest = content_digest(files)
    if expected_digest is not None and digest != expected_digest:
        raise PolicyInvalid(
            f"policy {source or 'package'} changed: its content hash is {digest}, "
            f"not the expected {expected_digest}"
        )
    if MANIFEST not in files:
        raise PolicyInvalid(f"policy {source or 'package'} has no {MANIFEST}")
    manifest = parse_manifest(files[MANIFEST])
    module_path = manifest.module.replace(".", "/")
    if f"{module_path}.py" not in files and f"{module_path}/__init__.py" not in files:
        raise PolicyInvalid(
            f"the entry module {manifest.module!r} of {manifest.entry!r} is not in the package"
        )
    refused = sorted(set(manifest.requirements) - set(allowed))
    if refused:
        allow = ", ".join(sorted(allowed)) or "nothing"
        raise DependencyRefused(
            f"policy {manifest.name} requires {', '.join(refused)}, not on this node's "
            f"allow-list (sandbox.allowed_packages: {allow})"
        )
    return manifest, digest


def load_package(
    path: Path | str,
    *,
    expected_digest: str | None = None,
    allowed: Iterable[str] = (),
    trusted: bool = False,
) -> PolicyPackage:
    """The package at `path`, checked (see `check_package`); PolicyInvalid says why not."""
    path = Path(path)
    files = read_files(path)
    manifest, digest = check_package(
        files, expected_digest=expected_digest, allowed=allowed, source=str(path)
    )
    return PolicyPackage(manifest, files, digest, source=str(path), trusted=trusted)
