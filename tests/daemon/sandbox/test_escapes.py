"""Escape attempts, each an actual try by a policy (attack_policy/attacks.py) in a pool
with the node's defaults: every one fails or is killed, the failure reaches the caller as
a typed error and is counted, and the pool keeps serving (an honest call follows each).
Where this machine lacks the layer that stops an attempt, the test skips and says which."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.sandbox import (
    CallTimeout,
    DependencyRefused,
    MessageTooLarge,
    PolicyFailed,
    SandboxConfig,
    SandboxError,
    SandboxPool,
    WorkerCrashed,
    load_package,
)
from daemon.sandbox.package import PolicyPackage
from tests.daemon.sandbox.policies import make_policy

ATTACKS = Path(__file__).parent / "attack_policy"
SECRET = b"node-secret-key-material"
CONFIG = SandboxConfig(spare_workers=0, call_timeout_s=5.0)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fake node home with a key and an RPC cookie."""
    home = tmp_path / "node-home"
    home.mkdir()
    (home / "node.key").write_bytes(SECRET)
    (home / "rpc.cookie").write_bytes(SECRET + b"-cookie")
    for path in home.iterdir():
        path.chmod(0o600)
    return home


@pytest.fixture
async def pool(home: Path) -> AsyncIterator[SandboxPool]:
    async with SandboxPool(CONFIG, hidden_paths=[home]) as pool:
        yield pool


@pytest.fixture
def attacker() -> PolicyPackage:
    return load_package(ATTACKS)


def needs(pool: SandboxPool, *layers: str) -> None:
    """Skips (printing why) unless one of `layers` is on here."""
    if not any(pool.layers.get(layer, "").startswith("on") for layer in layers):
        states = "; ".join(f"{layer}: {pool.layers.get(layer)}" for layer in layers)
        print(f"skipped: no layer that stops this attempt is on ({states})")
        pytest.skip(f"needs one of {', '.join(layers)} ({states})")


async def attack(pool: SandboxPool, policy: PolicyPackage, which: str, /, **args: Any) -> Any:
    return await pool.call(policy, "eval", {"input_data": {"attack": which, "args": args}})


async def still_serving(pool: SandboxPool, policy: PolicyPackage, kind: str | None) -> None:
    """An honest call succeeds after the attempt, and the attempt was counted."""
    assert await attack(pool, policy, "honest") == "ok"
    if kind is not None:
        assert pool.counters.failures[kind] >= 1, pool.counters.snapshot()


async def test_tcp_connection_to_the_host(pool: SandboxPool, attacker: PolicyPackage) -> None:
    needs(pool, "namespaces", "landlock", "seccomp")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        with pytest.raises(PolicyFailed, match="OSError|PermissionError|ConnectionRefused") as info:
            await attack(pool, attacker, "tcp_connect", host="127.0.0.1", port=port)
        print("tcp connect:", info.value.message)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the listener
    finally:
        listener.close()
    await still_serving(pool, attacker, "policy_error")


async def test_name_resolution(pool: SandboxPool, attacker: PolicyPackage) -> None:
    needs(pool, "namespaces", "landlock", "seccomp")
    with pytest.raises(PolicyFailed, match="gaierror|OSError|PermissionError"):
        await attack(pool, attacker, "resolve", name="example.com")
    await still_serving(pool, attacker, "policy_error")


async def test_reading_the_node_key_and_rpc_cookie(
    pool: SandboxPool, attacker: PolicyPackage, home: Path
) -> None:
    needs(pool, "namespaces", "landlock")
    paths = [str(home / "node.key"), str(home / "rpc.cookie")]
    found = await attack(pool, attacker, "read_files", paths=paths)
    print("reading the home:", found)
    for path in paths:
        assert isinstance(found[path], str) and "Error" in found[path]
    listing = await attack(pool, attacker, "list_folder", path=str(home))
    assert listing in ([],) or "Error" in listing
    assert SECRET not in repr(found).encode() and "node.key" not in repr(listing)
    await still_serving(pool, attacker, None)


async def test_writing_outside_scratch(
    pool: SandboxPool, attacker: PolicyPackage, tmp_path: Path
) -> None:
    needs(pool, "namespaces", "landlock")
    assert await attack(pool, attacker, "write_scratch") == "fine"  # scratch is writable
    for target in (
        tmp_path / "escaped.txt",
        Path("/tmp") / f"gm-escape-{os.getpid()}",
        Path("/etc/gm-escape"),
    ):
        with pytest.raises(PolicyFailed, match="OSError|PermissionError|Read-only"):
            await attack(pool, attacker, "write_file", path=str(target))
        assert not target.exists()
    await still_serving(pool, attacker, "policy_error")


async def test_fork_bomb(pool: SandboxPool, attacker: PolicyPackage) -> None:
    needs(pool, "seccomp")
    with pytest.raises(PolicyFailed, match="PermissionError"):
        await attack(pool, attacker, "fork_bomb")
    await still_serving(pool, attacker, "policy_error")


async def test_allocating_10_gib(pool: SandboxPool, attacker: PolicyPackage) -> None:
    with pytest.raises(PolicyFailed, match="MemoryError"):
        await attack(pool, attacker, "allocate", gib=10)
    await still_serving(pool, attacker, "policy_error")


async def test_spinning_forever(pool: SandboxPool, attacker: PolicyPackage) -> None:
    with trio.fail_after(30):
        with pytest.raises(CallTimeout, match="ran past its deadline"):
            await pool.call(attacker, "eval", {"input_data": {"attack": "spin"}}, timeout_s=0.5)
    assert pool.counters.kills == 1
    await still_serving(pool, attacker, "timeout")


async def test_os_system_and_subprocess(
    pool: SandboxPool, attacker: PolicyPackage, tmp_path: Path
) -> None:
    needs(pool, "seccomp")
    marker = tmp_path / "ran"
    status = await attack(pool, attacker, "system", command=f"touch {marker}")
    assert status != 0 and not marker.exists()
    with pytest.raises(PolicyFailed, match="PermissionError"):
        await attack(pool, attacker, "run_process", argv=["/usr/bin/touch", str(marker)])
    assert not marker.exists()
    await still_serving(pool, attacker, "policy_error")


async def test_ctypes_tricks(pool: SandboxPool, attacker: PolicyPackage) -> None:
    needs(pool, "seccomp")
    forked = await attack(pool, attacker, "ctypes_fork")
    assert forked["pid"] == -1 and forked["errno"] == 1  # EPERM from the filter
    calls = await attack(pool, attacker, "ctypes_unshare_and_mount")
    assert calls["unshare"] == -1 and calls["mount"] == -1
    # a segfault kills the worker: reported, and it is replaced
    with pytest.raises(WorkerCrashed, match="SIGSEGV"):
        await attack(pool, attacker, "ctypes_segfault")
    # a forged frame header announcing 4 GiB: refused unread, the worker replaced
    with pytest.raises(MessageTooLarge, match="4294967295 bytes, over the limit"):
        await attack(pool, attacker, "forge_reply_header")
    assert pool.counters.kills == 1 and pool.counters.failures["crashed"] == 1
    assert pool.counters.crashes == 1  # the segfault, counted once
    await still_serving(pool, attacker, "too_large")


async def test_forged_frames_and_closed_pipes(pool: SandboxPool, attacker: PolicyPackage) -> None:
    with pytest.raises(WorkerCrashed, match="malformed reply"):
        await attack(pool, attacker, "forge_garbage_frame")
    with pytest.raises(WorkerCrashed, match="worker died during the call|closed its pipe"):
        await attack(pool, attacker, "close_pipes")
    # the first is killed; the second exits by itself when it cannot answer: both replaced
    assert pool.counters.kills + pool.counters.crashes == 2 and pool.counters.kills >= 1
    await still_serving(pool, attacker, "crashed")


async def test_a_100_mib_return_value(pool: SandboxPool, attacker: PolicyPackage) -> None:
    with pytest.raises(MessageTooLarge, match="reply is 104857\\d+ bytes, over the limit"):
        await attack(pool, attacker, "big_reply", mib=100)
    await still_serving(pool, attacker, "too_large")


async def test_importing_a_package_not_on_the_allow_list(
    pool: SandboxPool, attacker: PolicyPackage, tmp_path: Path
) -> None:
    # installed here (the daemon uses it), yet not the policy's
    with pytest.raises(PolicyFailed, match="import of 'msgspec' refused"):
        await attack(pool, attacker, "import_module", name="msgspec")
    with pytest.raises(PolicyFailed, match="import of 'daemon' refused"):
        await attack(pool, attacker, "import_module", name="daemon.sandbox.pool")
    await still_serving(pool, attacker, "policy_error")
    # a manifest that asks for it is refused before any code runs
    asking = make_policy(tmp_path / "asks", name="asks", requirements=("msgspec",))
    with pytest.raises(DependencyRefused, match="requires msgspec, not on this node's allow-list"):
        load_package(asking, allowed=CONFIG.allowed_packages)


async def test_signalling_a_process_outside(pool: SandboxPool, attacker: PolicyPackage) -> None:
    needs(pool, "landlock")
    if "signals" not in pool.layers["landlock"]:
        pytest.skip(f"Landlock here cannot scope signals ({pool.layers['landlock']})")
    victim = subprocess.Popen(["sleep", "30"])  # noqa: ASYNC220 (a bystander, started at once)
    try:
        with pytest.raises(PolicyFailed, match="PermissionError"):
            await attack(pool, attacker, "kill_pid", pid=victim.pid)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    await still_serving(pool, attacker, "policy_error")


async def test_each_failure_reached_the_counters(
    pool: SandboxPool, attacker: PolicyPackage
) -> None:
    before = pool.counters.calls
    for name, error in (("allocate", PolicyFailed), ("big_reply", MessageTooLarge)):
        with pytest.raises(SandboxError) as info:
            await attack(
                pool, attacker, name, **({"gib": 10} if name == "allocate" else {"mib": 100})
            )
        assert isinstance(info.value, error)
    snapshot = pool.counters.snapshot()
    assert snapshot["calls"] == before + 2
    assert snapshot["failures"] == {"policy_error": 1, "too_large": 1}
