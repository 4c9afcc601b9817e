"""Each isolation layer alone stops what it is for (so that none is masked by the others),
and the worker's state shows the limits and privileges the report claims."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from daemon.sandbox import PolicyFailed, SandboxConfig, SandboxPool, WorkerCrashed, load_package
from daemon.sandbox.seccomp import DENIED, program
from tests.daemon.sandbox.test_escapes import ATTACKS, SECRET, attack, needs

STATE = """
import os, resource
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())
limits = {name: resource.getrlimit(getattr(resource, name))[0]
          for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_NOFILE', 'RLIMIT_FSIZE', 'RLIMIT_CORE')}
return {'status': {k: v.strip() for k, v in status.items()}, 'limits': limits,
        'cwd': os.getcwd()}
"""


def only(layer: str, **kw: object) -> SandboxConfig:
    return SandboxConfig(spare_workers=0, layers=(layer,), **kw)  # type: ignore[arg-type]


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def secret_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "node.key").write_bytes(SECRET)
    return home


async def test_rlimits_and_privileges_as_reported(tmp_path: Path) -> None:
    from tests.daemon.sandbox.policies import make_policy

    state = load_package(make_policy(tmp_path / "state", STATE, name="state"))
    config = only("seccomp", memory_mib=512, cpu_s=30, open_files=32, file_size_mib=2)
    async with SandboxPool(config) as pool:
        needs(pool, "seccomp")
        result = await pool.call(state, "eval", {})
    status, limits = result["status"], result["limits"]
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert limits == {
        "RLIMIT_AS": 512 << 20,
        "RLIMIT_CPU": 30,
        "RLIMIT_NOFILE": 32,
        "RLIMIT_FSIZE": 2 << 20,
        "RLIMIT_CORE": 0,
    }
    assert "gridmesh-sandbox-" in result["cwd"]  # the worker's scratch


async def test_seccomp_alone(tmp_path: Path) -> None:
    attacker = load_package(ATTACKS)
    async with SandboxPool(only("seccomp")) as pool:
        needs(pool, "seccomp")
        assert pool.layers["namespaces"].startswith("off") and pool.isolated
        with pytest.raises(PolicyFailed, match="PermissionError"):
            await attack(pool, attacker, "fork_bomb")
        with pytest.raises(PolicyFailed, match="PermissionError: \\[Errno 13\\]"):
            await attack(pool, attacker, "tcp_connect", host="127.0.0.1", port=9)


async def test_landlock_alone(tmp_path: Path) -> None:
    attacker = load_package(ATTACKS)
    home, server = secret_home(tmp_path), listener()
    try:
        async with SandboxPool(only("landlock"), hidden_paths=[home]) as pool:
            needs(pool, "landlock")
            found = await attack(pool, attacker, "read_files", paths=[str(home / "node.key")])
            assert found == {str(home / "node.key"): "PermissionError: Permission denied"}
            with pytest.raises(PolicyFailed, match="PermissionError"):
                await attack(pool, attacker, "write_file", path=str(tmp_path / "out"))
            if "tcp" in pool.layers["landlock"]:
                port = server.getsockname()[1]
                with pytest.raises(PolicyFailed, match="PermissionError"):
                    await attack(pool, attacker, "tcp_connect", host="127.0.0.1", port=port)
    finally:
        server.close()
    assert not (tmp_path / "out").exists()


async def test_namespaces_alone(tmp_path: Path) -> None:
    attacker = load_package(ATTACKS)
    home, server = secret_home(tmp_path), listener()
    try:
        async with SandboxPool(only("namespaces"), hidden_paths=[home]) as pool:
            needs(pool, "namespaces")
            port = server.getsockname()[1]
            with pytest.raises(PolicyFailed, match="Network is unreachable"):
                await attack(pool, attacker, "tcp_connect", host="127.0.0.1", port=port)
            found = await attack(pool, attacker, "read_files", paths=[str(home / "node.key")])
            assert SECRET not in repr(found).encode()
            with pytest.raises(PolicyFailed, match="Read-only file system"):
                await attack(pool, attacker, "write_file", path=str(tmp_path / "out"))
            assert await attack(pool, attacker, "write_scratch") == "fine"
    finally:
        server.close()


def test_the_seccomp_program_is_well_formed() -> None:
    code = program()
    assert len(code) % 8 == 0 and len(code) // 8 < 4096  # BPF_MAXINSNS
    assert len(code) // 8 == 18 + 2 * len(DENIED) + 1


async def test_the_cpu_time_limit_kills_and_the_pool_replaces(tmp_path: Path) -> None:
    attacker = load_package(ATTACKS)
    async with SandboxPool(SandboxConfig(spare_workers=0, cpu_s=1)) as pool:
        # the deadline is far: the CPU-time limit ends it first
        with pytest.raises(WorkerCrashed, match="killed by SIGXCPU: its CPU-time limit"):
            await pool.call(attacker, "eval", {"input_data": {"attack": "spin"}}, timeout_s=30)
        assert await attack(pool, attacker, "honest") == "ok"
        assert pool.counters.failures["crashed"] == 1
