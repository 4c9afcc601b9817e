"""A seccomp filter (x86_64) built by hand as classic BPF: the worker may not create
processes (fork, vfork, clone without CLONE_THREAD, execve; clone3 answers ENOSYS so that
glibc falls back to clone for threads), open sockets other than AF_UNIX, or use the calls
that reach beyond the process (ptrace, process_vm_*, mount, unshare, setns, bpf, keyrings,
io_uring, perf events, modules, reboot, clocks...). Refused calls fail with EPERM
(EACCES for sockets); a call from another ABI (x32, i386) kills the process."""

from __future__ import annotations

import ctypes
import errno
import struct

from daemon.sandbox.syscalls import (
    ARCH_OK,
    PR_SET_NO_NEW_PRIVS,
    SYS_SECCOMP,
    prctl,
    syscall,
)

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
# classic BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06
# seccomp_data offsets
NR, ARCH, ARG0 = 0, 4, 16

CLONE = 56
CLONE3 = 435
SOCKET = 41
AF_UNIX = 1
CLONE_THREAD = 0x00010000
DENIED = {
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "execveat": 322,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "pidfd_getfd": 438,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "bpf": 321,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "reboot": 169,
    "swapon": 167,
    "swapoff": 168,
    "acct": 163,
    "settimeofday": 164,
    "clock_settime": 227,
    "adjtimex": 159,
    "clock_adjtime": 305,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "personality": 135,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "syslog": 103,
    "vhangup": 153,
}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program() -> bytes:
    """The filter's instructions (each 8 bytes)."""
    out = [
        _insn(LD_W_ABS, ARCH),
        _insn(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _insn(RET_K, RET_KILL_PROCESS),
        _insn(LD_W_ABS, NR),
        _insn(JGE_K, X32_SYSCALL_BIT, 0, 1),
        _insn(RET_K, RET_KILL_PROCESS),
        # clone: threads only (CLONE_THREAD in the flags, the first argument's low word)
        _insn(JEQ_K, CLONE, 0, 4),
        _insn(LD_W_ABS, ARG0),
        _insn(JSET_K, CLONE_THREAD, 0, 1),
        _insn(RET_K, RET_ALLOW),
        _insn(RET_K, RET_ERRNO | errno.EPERM),
        _insn(JEQ_K, CLONE3, 0, 1),
        _insn(RET_K, RET_ERRNO | errno.ENOSYS),
        # socket: AF_UNIX only
        _insn(JEQ_K, SOCKET, 0, 4),
        _insn(LD_W_ABS, ARG0),
        _insn(JEQ_K, AF_UNIX, 0, 1),
        _insn(RET_K, RET_ALLOW),
        _insn(RET_K, RET_ERRNO | errno.EACCES),
    ]
    for number in sorted(DENIED.values()):
        out += [_insn(JEQ_K, number, 0, 1), _insn(RET_K, RET_ERRNO | errno.EPERM)]
    out.append(_insn(RET_K, RET_ALLOW))
    return b"".join(out)


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> str:
    """Installs the filter on this process for good (after no_new_privs)."""
    if not ARCH_OK:
        raise OSError(errno.ENOSYS, "the filter's system call numbers are x86_64's")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    code = program()
    buffer = ctypes.create_string_buffer(code, len(code))
    prog = _Program(len(code) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    syscall(
        SYS_SECCOMP,
        ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
        ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(prog),
        what="seccomp",
    )
    return f"{len(DENIED)} calls refused, no new processes, sockets AF_UNIX only"
