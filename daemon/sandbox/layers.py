"""The isolation layers a worker puts itself in before it loads any policy code, each tried
in turn and reported ("on: what it does" or "off: why"):

- rlimits: CPU seconds, address space, open files, file size, processes, no core files.
- namespaces (needs root): new network namespace (no interface up: no network at all), new
  mount namespace in which every mount is read-only, the scratch folder is a private tmpfs
  of bounded size and each hidden path (the node's home) is covered by an empty one; new
  IPC and UTS namespaces.
- capabilities: all dropped (bounding, ambient, effective, permitted), and no_new_privs.
- landlock: reads only beneath Python's folders, /usr, /lib (and the operator's read_paths),
  writes only beneath scratch, no TCP (landlock.py).
- seccomp: no new processes, no sockets but AF_UNIX, no calls that reach beyond the process
  (seccomp.py).

`LayerConfig` is what the pool hands a worker (as JSON on its command line).
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable

import msgspec

from daemon.sandbox import landlock, seccomp, syscalls

SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/bin", "/etc/localtime")
DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


class LayerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's isolation: its scratch folder, what to hide and to read, its limits,
    and the layers to try."""

    scratch: str
    hidden_paths: tuple[str, ...] = ()
    read_paths: tuple[str, ...] = ()
    cpu_s: int = 60
    memory_bytes: int = 1 << 30
    open_files: int = 64
    file_size_bytes: int = 16 << 20
    processes: int = 64
    scratch_bytes: int = 32 << 20
    layers: tuple[str, ...] = ("namespaces", "landlock", "seccomp")


def python_read_paths() -> tuple[str, ...]:
    """The folders this interpreter imports from (its prefixes and the real path of its
    executable's folder, for a venv whose python is a link)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    return tuple(sorted(paths))


def set_rlimits(config: LayerConfig) -> str:
    limits = {
        resource.RLIMIT_CPU: (config.cpu_s, config.cpu_s + 1),
        resource.RLIMIT_AS: (config.memory_bytes, config.memory_bytes),
        resource.RLIMIT_NOFILE: (config.open_files, config.open_files),
        resource.RLIMIT_FSIZE: (config.file_size_bytes, config.file_size_bytes),
        resource.RLIMIT_NPROC: (config.processes, config.processes),
        resource.RLIMIT_CORE: (0, 0),
    }
    for kind, value in limits.items():
        resource.setrlimit(kind, value)
    note = " (uid 0: the kernel does not apply the process limit to root; seccomp refuses fork)"
    return (
        f"cpu {config.cpu_s} s, memory {config.memory_bytes >> 20} MiB, "
        f"{config.open_files} files, file size {config.file_size_bytes >> 20} MiB, "
        f"{config.processes} processes" + (note if os.geteuid() == 0 else "")
    )


def enter_namespaces(config: LayerConfig) -> str:
    """New network, mount, IPC and UTS namespaces; the filesystem read-only but for a tmpfs
    scratch; hidden paths covered."""
    if os.geteuid() != 0:
        raise PermissionError("not root: namespaces need CAP_SYS_ADMIN")
    flags = syscalls.CLONE_NEWNET | syscalls.CLONE_NEWNS | syscalls.CLONE_NEWIPC
    syscalls.unshare(flags | syscalls.CLONE_NEWUTS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, None)
    hidden = []
    for path in config.hidden_paths:
        if os.path.isdir(path):
            data = "size=4k,mode=000,nr_inodes=1"
            syscalls.mount("tmpfs", path, "tmpfs", syscalls.MS_RDONLY | _NOSUID_NODEV_NOEXEC, data)
            hidden.append(path)
        elif os.path.exists(path):
            syscalls.mount("/dev/null", path, None, syscalls.MS_BIND, None)
            hidden.append(path)
    attrs = syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
    syscalls.set_tree_attributes("/", attrs)
    data = f"size={config.scratch_bytes},mode=0700"
    syscalls.mount("tmpfs", config.scratch, "tmpfs", _NOSUID_NODEV_NOEXEC, data)
    os.chdir(config.scratch)  # the old cwd is the folder under the new mount
    return (
        f"network namespace without interfaces; read-only mounts, scratch a "
        f"{config.scratch_bytes >> 20} MiB tmpfs; {len(hidden)} hidden path(s)"
    )


_NOSUID_NODEV_NOEXEC = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC


def drop_privileges() -> str:
    syscalls.drop_capabilities()
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    return "no capabilities, no_new_privs"


def restrict_paths(config: LayerConfig) -> str:
    read = (*python_read_paths(), *SYSTEM_READ_PATHS, *config.read_paths)
    read = tuple(p for p in read if not any(_beneath(p, h) for h in config.hidden_paths))
    return landlock.restrict(read, (config.scratch,), DEVICE_FILES)


def _beneath(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(
        folder
    )


def apply(config: LayerConfig) -> dict[str, str]:
    """Every layer, in the order they must go (namespaces need the capabilities that the
    next step drops; seccomp refuses the calls that the others make), and the report."""
    steps: list[tuple[str, Callable[[], str]]] = [("rlimits", lambda: set_rlimits(config))]
    if "namespaces" in config.layers:
        steps.append(("namespaces", lambda: enter_namespaces(config)))
    steps.append(("capabilities", drop_privileges))
    if "landlock" in config.layers:
        steps.append(("landlock", lambda: restrict_paths(config)))
    if "seccomp" in config.layers:
        steps.append(("seccomp", seccomp.install))
    off = "off: not asked for (sandbox.layers)"
    report = {"rlimits": "", "namespaces": off, "capabilities": "", "landlock": off, "seccomp": off}
    for name, step in steps:
        try:
            report[name] = "on: " + step()
        except OSError as exc:
            report[name] = f"off: {exc.strerror or exc}"
    return report
