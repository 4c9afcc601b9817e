"""Escape attempts. Each returns what it managed (the test asserts it managed nothing) or
raises; none should succeed inside the sandbox."""

import ctypes
import os
import socket
import subprocess
import sys


def honest():
    return "ok"


def tcp_connect(host, port):
    with socket.create_connection((host, port), timeout=2) as conn:
        conn.sendall(b"escaped")
    return "connected"


def resolve(name):
    return socket.getaddrinfo(name, 80)[0][4][0]


def read_files(paths):
    found = {}
    for path in paths:
        try:
            with open(path, "rb") as handle:
                found[path] = handle.read()
        except OSError as exc:
            found[path] = f"{type(exc).__name__}: {exc.strerror}"
    return found


def list_folder(path):
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"


def write_file(path):
    with open(path, "w") as handle:
        handle.write("escaped")
    return "written"


def write_scratch():
    with open("scratch-file.txt", "w") as handle:
        handle.write("fine")
    with open("scratch-file.txt") as handle:
        return handle.read()


def fork_bomb():
    children = 0
    while children < 10_000:
        if os.fork() == 0:
            while True:
                os.fork()
        children += 1
    return children


def allocate(gib):
    block = bytearray(gib << 30)
    return len(block)


def spin():
    while True:
        pass


def system(command):
    return os.system(command)


def run_process(argv):
    return subprocess.run(argv, capture_output=True).returncode


def ctypes_fork():
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.syscall(57)  # fork(2), straight to the kernel
    if pid == 0:
        os._exit(0)
    return {"pid": pid, "errno": ctypes.get_errno()}


def ctypes_unshare_and_mount():
    libc = ctypes.CDLL(None, use_errno=True)
    results = {"unshare": libc.unshare(0x40000000)}
    results["mount"] = libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)
    results["setuid"] = libc.setuid(0) if os.getuid() else "already 0 without capabilities"
    return results


def ctypes_segfault():
    return ctypes.string_at(0xFFFF800000000000, 16)  # kernel space: SIGSEGV


def forge_reply_header():
    """Writes a frame header announcing 4 GiB on the worker's reply pipe."""
    import json

    fd = json.loads(sys.argv[-1])["reply_fd"]
    os.write(fd, b"\xff\xff\xff\xff")
    return "sent"


def big_reply(mib):
    return b"x" * (mib << 20)


def import_module(name):
    import importlib

    return importlib.import_module(name).__name__


def kill_pid(pid):
    os.kill(pid, 9)
    return "signalled"


def forge_garbage_frame():
    """Writes a frame whose body is not msgpack (0xc1 is never used) on the reply pipe."""
    import json

    fd = json.loads(sys.argv[-1])["reply_fd"]
    os.write(fd, b"\x00\x00\x00\x03\xc1\xc1\xc1")
    return "sent"


def close_pipes():
    import json

    config = json.loads(sys.argv[-1])
    os.close(config["reply_fd"])
    return "closed"
