"""Landlock (Linux >= 5.13): the worker restricts itself to reading a short list of folders
(Python's, /usr, /lib), writing only its scratch folder, no TCP bind or connect (ABI >= 4),
and no abstract unix sockets or signals outside its own domain (ABI >= 6). Rights that the
running kernel's ABI does not know are left out, and the report says which ABI applied."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

from daemon.sandbox.syscalls import (
    SYS_LANDLOCK_ADD_RULE,
    SYS_LANDLOCK_CREATE_RULESET,
    SYS_LANDLOCK_RESTRICT_SELF,
    syscall,
)

CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE
# the rights each ABI added: 1: up to MAKE_SYM, 2: REFER, 3: TRUNCATE, 5: IOCTL_DEV
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
TRUNCATE = 1 << 14
IOCTL_DEV = 1 << 15
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1


class RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI; OSError where it has none (or it is disabled)."""
    return syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(CREATE_RULESET_VERSION),
        what="landlock_create_ruleset",
    )


def _fs_rights(abi: int) -> int:
    return FS_BY_ABI[max(k for k in FS_BY_ABI if k <= abi)]


def restrict(read: Iterable[str], write: Iterable[str], files: Iterable[str]) -> str:
    """Restricts this process (and what it starts) for good: read and execute beneath each
    of `read`, everything beneath each of `write`, read and write of each of `files` (device
    files such as /dev/null). Paths that do not exist are skipped. Needs no_new_privs.
    Returns what it restricted, for the layer report."""
    abi = abi_version()
    fs = _fs_rights(abi)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        ctypes.byref(attr),
        ctypes.c_size_t(size),
        ctypes.c_uint32(0),
        what="landlock_create_ruleset",
    )
    try:
        file_rights = FILE_RIGHTS | (fs & (TRUNCATE | IOCTL_DEV))
        rules = [(p, READ_FILE | READ_DIR | EXECUTE) for p in read]
        rules += [(p, fs) for p in write]
        rules += [(p, file_rights) for p in files]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not os.path.isdir(path):
                    rights &= file_rights
                rule = PathBeneath(rights & fs, fd)
                syscall(
                    SYS_LANDLOCK_ADD_RULE,
                    ctypes.c_int(ruleset),
                    ctypes.c_int(RULE_PATH_BENEATH),
                    ctypes.byref(rule),
                    ctypes.c_uint32(0),
                    what=f"landlock_add_rule {path}",
                )
            finally:
                os.close(fd)
        syscall(
            SYS_LANDLOCK_RESTRICT_SELF,
            ctypes.c_int(ruleset),
            ctypes.c_uint32(0),
            what="landlock_restrict_self",
        )
    finally:
        os.close(ruleset)
    parts = (
        ["filesystem"]
        + (["tcp"] if net else [])
        + (["signals, abstract sockets"] if scoped else [])
    )
    return f"ABI {abi}: {', '.join(parts)}"
