"""The pool of sandbox workers: results, typed failures, deadlines, size bounds, warm
reuse, one policy per worker, replacement of dead workers, counters, and the refusal of
untrusted policies where no isolation layer is on."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from daemon.sandbox import (
    CallTimeout,
    DependencyRefused,
    IsolationRefused,
    MessageTooLarge,
    PolicyFailed,
    PolicyInvalid,
    PoolClosed,
    SandboxConfig,
    SandboxPool,
    WorkerCrashed,
    load_package,
)
from daemon.sandbox.package import PolicyPackage
from tests.daemon.sandbox.policies import make_policy

FAST = SandboxConfig(spare_workers=0, call_timeout_s=5.0)


def policy(tmp_path: Path, body: str = "", name: str = "p", **kw) -> PolicyPackage:
    args = (body,) if body else ()
    return load_package(make_policy(tmp_path / name, *args, name=name, **kw))


async def test_calls_return_results_and_keep_the_instance(tmp_path: Path) -> None:
    echo = policy(tmp_path, name="echo")
    async with SandboxPool(FAST) as pool:
        ref = echo.bind(rule_id="assign", settings={"k": 1})
        result = await pool.call(ref, "eval", {"input_data": {"x": [1, 2.5, "s", b"b", None]}})
        assert result == {
            "echo": {"x": [1, 2.5, "s", b"b", None]},
            "rule": "assign",
            "settings": {"k": 1},
        }
        # management and eval reach the same instance, made once
        assert (await pool.call(ref, "management", {"action": "a"}))["count"] == 1
        assert (await pool.call(ref, "management", {"action": "b", "data": 7})) == {
            "action": "b",
            "data": 7,
            "count": 2,
        }
        # another rule id is another instance of the same class
        assert (await pool.call(echo.bind(rule_id="other"), "management", {}))["count"] == 1
        assert pool.counters.snapshot() == {
            "calls": 4,
            "ok": 4,
            "failures": {},
            "kills": 0,
            "crashes": 0,
            "started": 1,
        }
        with pytest.raises(ValueError, match="method must be one of"):
            await pool.call(ref, "__init__", {})
        with pytest.raises(ValueError, match="eval takes parameters, input_data, context"):
            await pool.call(ref, "eval", {"input": 1})


async def test_policy_errors_are_typed_and_the_pool_keeps_serving(tmp_path: Path) -> None:
    bad = policy(tmp_path, "if input_data == 'boom':\n    raise KeyError('nope')\nreturn 1", "bad")
    async with SandboxPool(FAST) as pool:
        with pytest.raises(PolicyFailed, match="policy bad eval raised KeyError: .*nope") as info:
            await pool.call(bad, "eval", {"input_data": "boom"})
        assert info.value.error_type == "KeyError" and info.value.kind == "policy_error"
        assert await pool.call(bad, "eval", {"input_data": "fine"}) == 1
        assert pool.counters.failures["policy_error"] == 1
        assert pool.counters.kills == 0  # a policy's exception does not cost its worker


async def test_a_policy_that_fails_to_load_is_reported(tmp_path: Path) -> None:
    broken = load_package(make_policy(tmp_path / "b", name="broken"))
    folder = tmp_path / "b"
    (folder / "function.py").write_text("raise RuntimeError('at import')\n")
    broken = load_package(folder)
    async with SandboxPool(FAST) as pool:
        with pytest.raises(PolicyFailed, match="RuntimeError: at import"):
            await pool.call(broken, "eval", {})
        assert pool.counters.kills == 1  # the half-loaded worker is not reused
        echo = policy(tmp_path, name="echo")
        assert (await pool.call(echo, "eval", {"input_data": 1}))["echo"] == 1


async def test_deadline_kills_and_replaces_the_worker(tmp_path: Path) -> None:
    slow = policy(tmp_path, "import time\nif input_data:\n    time.sleep(60)\nreturn 'ok'", "slow")
    async with SandboxPool(FAST) as pool:
        with trio.fail_after(30):
            with pytest.raises(CallTimeout, match="policy slow ran past its deadline of 0.5 s"):
                await pool.call(slow, "eval", {"input_data": True}, timeout_s=0.5)
        assert await pool.call(slow, "eval", {"input_data": False}) == "ok"
        assert pool.counters.kills == 1 and pool.counters.failures["timeout"] == 1


async def test_size_bounds_of_requests_and_replies(tmp_path: Path) -> None:
    big = policy(tmp_path, "return 'x' * input_data", "big")
    config = SandboxConfig(spare_workers=0, max_request_bytes=4096, max_reply_bytes=4096)
    async with SandboxPool(config) as pool:
        with pytest.raises(MessageTooLarge, match="the request is .* over the limit of 4096"):
            await pool.call(big, "eval", {"input_data": 1, "context": {"pad": "y" * 5000}})
        with pytest.raises(MessageTooLarge, match="reply is .* over the limit of 4096"):
            await pool.call(big, "eval", {"input_data": 5000})
        assert await pool.call(big, "eval", {"input_data": 3}) == "xxx"
        assert pool.counters.failures["too_large"] == 2
        with pytest.raises(PolicyInvalid, match="cannot be sent as msgpack"):
            await pool.call(big, "eval", {"input_data": object()})


async def test_workers_are_warm_and_never_shared_between_policies(tmp_path: Path) -> None:
    body = "import os\nreturn os.getpid()"
    first, second = policy(tmp_path, body, "first"), policy(tmp_path, body, "second")
    config = SandboxConfig(spare_workers=1, workers_per_policy=2, max_workers=4)
    async with SandboxPool(config) as pool:
        pids = {await pool.call(first, "eval", {}) for _ in range(20)}
        assert len(pids) == 1  # sequential calls reuse one warm worker
        other = await pool.call(second, "eval", {})
        assert other not in pids
        # concurrent calls of one policy use at most workers_per_policy workers
        seen: list[int] = []

        async def one() -> None:
            seen.append(await pool.call(first, "eval", {}))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
        assert len(seen) == 10 and len(set(seen)) <= 2 and other not in seen


async def test_a_dead_worker_is_replaced(tmp_path: Path) -> None:
    dying = policy(
        tmp_path, "import os\nif input_data:\n    os._exit(3)\nreturn os.getpid()", "dying"
    )
    async with SandboxPool(FAST) as pool:
        before = await pool.call(dying, "eval", {"input_data": False})
        with pytest.raises(WorkerCrashed, match="worker died during the call \\(exit status 3\\)"):
            await pool.call(dying, "eval", {"input_data": True})
        after = await pool.call(dying, "eval", {"input_data": False})
        assert after != before
        assert pool.counters.failures["crashed"] == 1
        assert pool.counters.crashes == 1 and pool.counters.kills == 0  # counted once


async def test_workers_are_recycled_after_max_calls(tmp_path: Path) -> None:
    pid = policy(tmp_path, "import os\nreturn os.getpid()", "pid")
    async with SandboxPool(SandboxConfig(spare_workers=0, max_calls_per_worker=3)) as pool:
        pids = [await pool.call(pid, "eval", {}) for _ in range(6)]
        assert len(set(pids[:3])) == 1 and len(set(pids[3:])) == 1 and pids[0] != pids[3]


async def test_untrusted_policies_need_an_isolation_layer(tmp_path: Path) -> None:
    echo = policy(tmp_path, name="echo")
    trusted = PolicyPackage(echo.manifest, echo.files, echo.digest, trusted=True)
    async with SandboxPool(SandboxConfig(spare_workers=0, layers=())) as pool:
        assert not pool.isolated
        assert pool.layers["seccomp"].startswith("off: not asked for")
        with pytest.raises(IsolationRefused, match="no isolation layer is on .*run_unisolated"):
            await pool.call(echo, "eval", {})
        assert pool.counters.failures["isolation"] == 1
        assert (await pool.call(trusted, "eval", {"input_data": 2}))["echo"] == 2
    opted_in = SandboxConfig(spare_workers=0, layers=(), run_unisolated=True)
    async with SandboxPool(opted_in) as pool:
        assert (await pool.call(echo, "eval", {"input_data": 3}))["echo"] == 3


async def test_layers_are_detected_and_reported(tmp_path: Path) -> None:
    async with SandboxPool(FAST) as pool:
        assert set(pool.layers) == {"rlimits", "namespaces", "capabilities", "landlock", "seccomp"}
        assert pool.layers["rlimits"].startswith("on: cpu 60 s, memory 1024 MiB")
        assert all(state.startswith(("on: ", "off: ")) for state in pool.layers.values())
    with pytest.raises(PoolClosed):
        await pool.call(policy(tmp_path), "eval", {})


async def test_concurrent_first_calls_respect_workers_per_policy(tmp_path: Path) -> None:
    pid = policy(tmp_path, "import os\nreturn os.getpid()", "pid")
    config = SandboxConfig(spare_workers=0, workers_per_policy=2, max_workers=8)
    async with SandboxPool(config) as pool:
        seen: list[int] = []

        async def one() -> None:
            seen.append(await pool.call(pid, "eval", {}))

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(one)
        assert len(seen) == 12 and len(set(seen)) == 2
        assert pool.counters.started == 2  # the first (spare) and one more, not one per call


async def test_a_worker_that_cannot_start_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.sandbox import pool as pool_module

    monkeypatch.setattr(pool_module, "BOOTSTRAP", "raise SystemExit('no python here')")
    with pytest.raises(WorkerCrashed, match="failed to start \\(exit status 1\\): no python here"):
        async with SandboxPool(FAST):
            pass


async def test_an_allowed_package_outside_pythons_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed where the daemon finds it (here: a folder on its sys.path, as a user site
    or PYTHONPATH would be), an allowed package is importable and readable in the worker."""
    site = tmp_path / "site"
    (site / "tinylib").mkdir(parents=True)
    (site / "tinylib" / "__init__.py").write_text("from tinylib.data import VALUE\n")
    (site / "tinylib" / "data.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(site))
    body = "import tinylib\nreturn tinylib.VALUE + 1"
    uses = load_package(
        make_policy(tmp_path / "uses", body, name="uses", requirements=("tinylib",)),
        allowed=("tinylib",),
    )
    async with SandboxPool(SandboxConfig(spare_workers=0, allowed_packages=("tinylib",))) as pool:
        assert await pool.call(uses, "eval", {}) == 42
    # not allowed by the operator: the worker refuses the manifest itself
    async with SandboxPool(SandboxConfig(spare_workers=0)) as pool:
        with pytest.raises(DependencyRefused, match="requires tinylib"):
            await pool.call(uses, "eval", {})
