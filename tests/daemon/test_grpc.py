"""The gRPC inference API, served in-process over a fake backend; sync clients in threads."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from daemon import errors
from daemon.api.grpc_backend import InferenceBackend, ShardBackend, forward_error_code
from daemon.api.grpc_messages import text_delta
from daemon.api.grpc_server import GRACE_S, HOST, MAX_RPCS_PER_PEER, SERVICE_NAME, serve_grpc
from daemon.api.proto import gridmesh_inference_pb2 as pb2
from daemon.api.proto import gridmesh_inference_pb2_grpc as pb2_grpc
from daemon.shards.service import MAX_JOBS, Job, ShardService
from p2p.aio import AsyncioBridge, open_bridge

DEADLINE = 10  # seconds; every RPC and wait in these tests is bounded by it
TOKEN = "grpc-test-token"
VOCAB = 16
ROUTE = [{"peer_id": "peerA", "start": 0, "end": 2}, {"peer_id": "peerB", "start": 2, "end": 4}]


def expected_tokens(ids: list[int], n: int, seed: int | None) -> list[int]:
    """The fake's generation: lowercase letters, so a token's text is its byte."""
    return [97 + (sum(ids) + 3 * i + (seed or 0)) % 26 for i in range(n)]


def expected_logits(ids: list[int]) -> list[float]:
    return [((sum(ids) + 7 * i) % VOCAB) / 4 - 1.0 for i in range(VOCAB)]  # exact in float32


@dataclass
class FakeJob:
    id: str
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    error_code: str | None = None

    @property
    def text(self) -> str:
        return bytes(self.tokens).decode()


class FakeBackend:
    """Deterministic tokens. Models: "slow" gives one token, then the rest on `release`;
    "broken" fails after two tokens; "gone" fails as unavailable; "missing" is unknown;
    "crash" raises a bug; "slowfwd" holds Forward until `forward_gate`."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.jobs: dict[str, FakeJob] = {}
        self.requests: list[dict[str, Any]] = []
        self.owners: list[str] = []
        self.release = trio.Event()
        self.cancelled: list[str] = []
        self.cancel_seen = trio.Event()
        self.forward_started = trio.Event()
        self.forward_gate = trio.Event()

    async def start_generation(
        self,
        model: str,
        prompt: str | None,
        token_ids: list[int] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        owner: str = "",
        job_id: str | None = None,
    ) -> str:
        self.owners.append(owner)
        self.requests.append(
            {
                "model": model,
                "prompt": prompt,
                "token_ids": token_ids,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": seed,
                **({"job_id": job_id} if job_id is not None else {}),
            }
        )
        if model == "missing":
            raise errors.ModelNotServed("no server announces model 'missing'")
        if model == "crash":
            raise RuntimeError("a bug")
        ids = token_ids if token_ids is not None else list((prompt or "").encode())
        tokens = expected_tokens(ids, max_tokens, seed)
        job = FakeJob(f"job{len(self.jobs)}")
        self.jobs[job.id] = job
        if model == "slow":
            job.tokens.append(tokens[0])

            async def finish() -> None:
                await self.release.wait()
                job.tokens.extend(tokens[1:])
                job.done = True

            self.nursery.start_soon(finish)
        elif model in ("broken", "gone"):
            job.tokens.extend(tokens[:2])
            job.error, job.done = "peerB: stream reset", True
            job.error_code = "unavailable" if model == "gone" else None
        else:
            job.tokens.extend(tokens)
            job.done = True
        return job.id

    def poll(self, job_id: str, since: int) -> dict[str, Any]:
        job = self.jobs[job_id]
        return {
            "job": job.id,
            "tokens": job.tokens[since:],
            "n_tokens": len(job.tokens),
            "text": job.text,
            "done": job.done,
            "error": job.error,
            "error_code": job.error_code,
            "route": ROUTE,
            "recoveries": [{"peer_id": "peerC", "reason": "reset", "seconds": 0.1}],
            "seconds": 0.25 if job.done else None,
        }

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        self.cancel_seen.set()

    async def forward(self, model: str, token_ids: list[int]) -> tuple[list[float], int]:
        if model == "missing":
            raise errors.ModelNotServed("no server announces model 'missing'")
        if model == "slowfwd":
            self.forward_started.set()
            await self.forward_gate.wait()
        logits = expected_logits(token_ids)
        return logits, max(range(VOCAB), key=logits.__getitem__)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call, as a real client would."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self.token}")]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def authed_channel(port: int, token: str = TOKEN) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(f"{HOST}:{port}"), _Bearer(token))


@dataclass
class Served:
    port: int
    backend: Any
    bridge: AsyncioBridge
    channel: grpc.Channel
    scope: trio.CancelScope
    stopped: trio.Event
    rejects: list[str] = field(default_factory=list)

    @property
    def stub(self) -> pb2_grpc.InferenceStub:
        return pb2_grpc.InferenceStub(self.channel)


@asynccontextmanager
async def serving(
    make_backend: Callable[[trio.Nursery], InferenceBackend] = FakeBackend,
) -> AsyncIterator[Served]:
    async with open_bridge() as bridge, trio.open_nursery() as nursery:
        backend = make_backend(nursery)
        scope, stopped = trio.CancelScope(), trio.Event()
        rejects: list[str] = []

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_grpc(
                    bridge,
                    backend,
                    port=0,
                    token=TOKEN,
                    on_reject=rejects.append,
                    task_status=task_status,
                )
            stopped.set()

        port = await nursery.start(run)
        channel = authed_channel(port)
        try:
            yield Served(port, backend, bridge, channel, scope, stopped, rejects)
        finally:
            channel.close()
            nursery.cancel_scope.cancel()


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def failure(fn: Callable[[], Any]) -> grpc.RpcError:
    """The RpcError that `fn` raises."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


def generate(served: Served, **fields: Any) -> list[pb2.GenerateReply]:
    return list(served.stub.Generate(pb2.GenerateRequest(**fields), timeout=DEADLINE))


async def test_generate_streams_every_token_in_order() -> None:
    async with serving() as served:
        replies = await in_thread(
            lambda: generate(
                served,
                model="m",
                token_ids=pb2.TokenIds(ids=[1, 2, 3]),
                max_tokens=20,
                temperature=0.7,
                seed=5,
            )
        )
    expected = expected_tokens([1, 2, 3], 20, 5)
    *tokens, final = replies
    assert [r.token_id for r in tokens] == expected
    assert [r.index for r in tokens] == list(range(20))
    assert all(r.HasField("token_id") and not r.done for r in tokens)
    assert final.done and not final.HasField("token_id")
    assert final.n_tokens == 20 and final.recoveries == 1 and final.seconds == 0.25
    assert [(h.peer_id, h.start, h.end) for h in final.route] == [
        ("peerA", 0, 2),
        ("peerB", 2, 4),
    ]
    assert final.text == bytes(expected).decode()
    assert "".join(r.text_delta for r in replies) == final.text
    request = served.backend.requests[0]
    assert request["token_ids"] == [1, 2, 3] and request["prompt"] is None
    assert request["seed"] == 5 and request["temperature"] == pytest.approx(0.7)


async def test_generate_from_text_with_defaults() -> None:
    async with serving() as served:
        replies = await in_thread(lambda: generate(served, model="m", text="hi"))
    request = served.backend.requests[0]
    assert request["prompt"] == "hi" and request["token_ids"] is None
    assert request["max_tokens"] == 32 and request["seed"] is None
    assert request["temperature"] == 0.0
    assert [r.token_id for r in replies[:-1]] == expected_tokens(list(b"hi"), 32, None)


async def test_generate_delivers_tokens_before_the_end() -> None:
    async with serving() as served:
        call = served.stub.Generate(
            pb2.GenerateRequest(model="slow", token_ids=pb2.TokenIds(ids=[4]), max_tokens=5),
            timeout=DEADLINE,
        )
        first = await in_thread(next, call)
        expected = expected_tokens([4], 5, None)
        assert first.token_id == expected[0] and first.text_delta == chr(expected[0])
        (job,) = served.backend.jobs.values()
        assert not job.done  # the first token arrived while the generation still runs
        served.backend.release.set()
        rest = await in_thread(list, call)
    assert [r.token_id for r in rest[:-1]] == expected[1:]
    assert rest[-1].done and rest[-1].text == bytes(expected).decode()
    assert served.backend.cancelled == []


async def test_a_client_that_hangs_up_cancels_its_generation() -> None:
    async with serving() as served:
        call = served.stub.Generate(
            pb2.GenerateRequest(model="slow", token_ids=pb2.TokenIds(ids=[4]), max_tokens=5),
            timeout=DEADLINE,
        )
        await in_thread(next, call)
        call.cancel()
        with trio.fail_after(DEADLINE):
            await served.backend.cancel_seen.wait()
        assert served.backend.cancelled == list(served.backend.jobs)


async def test_forward_returns_float32_logits() -> None:
    async with serving() as served:
        reply = await in_thread(
            lambda: served.stub.Forward(
                pb2.ForwardRequest(model="m", token_ids=[3, 1, 4]), timeout=DEADLINE
            )
        )
    logits = expected_logits([3, 1, 4])
    assert reply.vocab_size == VOCAB and len(reply.logits) == 4 * VOCAB
    assert list(struct.unpack(f"<{VOCAB}f", reply.logits)) == logits
    assert reply.next_token == logits.index(max(logits))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "", "text": "hi"}, "model must be 1 to 256 characters"),
        ({"model": "x" * 300, "text": "hi"}, "model must be 1 to 256 characters"),
        ({"model": "m"}, "give a prompt"),
        ({"model": "m", "text": ""}, "prompt must be 1 to 1048576 characters"),
        ({"model": "m", "token_ids": pb2.TokenIds()}, "token_ids must be 1 to 32768 items"),
        ({"model": "m", "text": "hi", "max_tokens": 0}, "max_tokens must be 1 to 4096"),
        ({"model": "m", "text": "hi", "max_tokens": -3}, "max_tokens must be 1 to 4096"),
        ({"model": "m", "text": "hi", "max_tokens": 4097}, "max_tokens must be 1 to 4096"),
        ({"model": "m", "text": "hi", "temperature": -1.0}, "temperature must be"),
        ({"model": "m", "text": "hi", "temperature": float("nan")}, "temperature must be"),
        ({"model": "m", "text": "hi", "job_id": "0x1234"}, "job_id: Expected `str` matching regex"),
        (
            {"model": "m", "text": "hi", "job_id": "zz" * 32},
            "job_id: Expected `str` matching regex",
        ),
    ],
)
async def test_generate_rejects_bad_arguments(fields: dict[str, Any], message: str) -> None:
    async with serving() as served:
        error = await in_thread(failure, lambda: generate(served, **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert served.backend.requests == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "", "token_ids": [1]}, "model must be 1 to 256 characters"),
        ({"model": "m"}, "token_ids must be 1 to 4096 items"),
        ({"model": "m", "token_ids": [1] * 4097}, "token_ids must be 1 to 4096 items"),
    ],
)
async def test_forward_rejects_bad_arguments(fields: dict[str, Any], message: str) -> None:
    async with serving() as served:
        error = await in_thread(
            failure,
            lambda: served.stub.Forward(pb2.ForwardRequest(**fields), timeout=DEADLINE),
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


@pytest.mark.parametrize(
    ("model", "status", "message"),
    [
        ("missing", grpc.StatusCode.NOT_FOUND, "no server announces model 'missing'"),
        ("crash", grpc.StatusCode.INTERNAL, "internal error: RuntimeError"),
    ],
)
async def test_generate_maps_backend_errors(
    model: str, status: grpc.StatusCode, message: str
) -> None:
    async with serving() as served:
        error = await in_thread(failure, lambda: generate(served, model=model, text="hi"))
    assert error.code() == status and error.details() == message


@pytest.mark.parametrize(
    ("model", "status"),
    [("broken", grpc.StatusCode.ABORTED), ("gone", grpc.StatusCode.UNAVAILABLE)],
)
async def test_a_failed_generation_ends_the_stream_after_its_tokens(
    model: str, status: grpc.StatusCode
) -> None:
    got: list[pb2.GenerateReply] = []

    def collect() -> None:
        request = pb2.GenerateRequest(model=model, token_ids=pb2.TokenIds(ids=[7]), max_tokens=9)
        got.extend(served.stub.Generate(request, timeout=DEADLINE))

    async with serving() as served:
        error = await in_thread(failure, collect)
    assert error.code() == status and error.details() == "peerB: stream reset"
    assert [r.token_id for r in got] == expected_tokens([7], 9, None)[:2]


async def test_forward_maps_backend_errors() -> None:
    async with serving() as served:
        error = await in_thread(
            failure,
            lambda: served.stub.Forward(
                pb2.ForwardRequest(model="missing", token_ids=[1]), timeout=DEADLINE
            ),
        )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_health_reports_serving() -> None:
    async with serving() as served:
        health = health_pb2_grpc.HealthStub(served.channel)

        def check(service: str) -> Any:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)

        overall = await in_thread(check, "")
        inference = await in_thread(check, SERVICE_NAME)
        unknown = await in_thread(failure, lambda: check("no.such.Service"))
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert inference.status == health_pb2.HealthCheckResponse.SERVING
    assert unknown.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_inference_service() -> None:
    async with serving() as served:
        stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        listed, described = await in_thread(
            lambda: list(stub.ServerReflectionInfo(iter(requests), timeout=DEADLINE))
        )
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the .proto, serialized


async def test_the_asyncio_loop_stays_free_while_a_backend_call_waits() -> None:
    async with serving() as served, trio.open_nursery() as nursery:
        replies: list[pb2.ForwardReply] = []

        async def forward() -> None:
            request = pb2.ForwardRequest(model="slowfwd", token_ids=[2])
            replies.append(await in_thread(lambda: served.stub.Forward(request, timeout=DEADLINE)))

        nursery.start_soon(forward)
        with trio.fail_after(DEADLINE):
            await served.backend.forward_started.wait()
            await served.bridge.run(asyncio.sleep, 0)  # the loop still runs other work
        health = health_pb2_grpc.HealthStub(served.channel)
        other = await in_thread(
            lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
        )
        assert other.status == health_pb2.HealthCheckResponse.SERVING
        served.backend.forward_gate.set()
    assert replies[0].vocab_size == VOCAB


async def test_cancellation_stops_the_server_within_a_second() -> None:
    async with serving() as served, trio.open_nursery() as nursery:
        call = served.stub.Generate(
            pb2.GenerateRequest(model="slow", token_ids=pb2.TokenIds(ids=[4]), max_tokens=5),
            timeout=DEADLINE,
        )
        await in_thread(next, call)  # a generation is in flight
        errors: list[grpc.RpcError] = []

        async def drain() -> None:
            errors.append(await in_thread(failure, lambda: list(call)))

        nursery.start_soon(drain)
        started = time.monotonic()
        served.scope.cancel()
        with trio.fail_after(DEADLINE):
            await served.stopped.wait()
        assert time.monotonic() - started < 1.0
    assert errors[0].code() == grpc.StatusCode.UNAVAILABLE
    assert errors[0].details() == "the daemon is shutting down"
    assert served.backend.cancelled == list(served.backend.jobs)  # the generation is stopped
    with grpc.insecure_channel(f"{HOST}:{served.port}") as channel:
        stub = pb2_grpc.InferenceStub(channel)
        request = pb2.ForwardRequest(model="m", token_ids=[1])
        refused = await in_thread(failure, lambda: stub.Forward(request, timeout=2))
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert GRACE_S <= 1.0


async def test_a_taken_port_is_an_error() -> None:
    async with serving() as served:
        with pytest.raises(OSError, match="cannot listen"):
            await serve_grpc(served.bridge, served.backend, port=served.port, token=TOKEN)


def test_text_delta_holds_back_an_incomplete_character() -> None:
    assert text_delta("", "ab\ufffd", final=False) == ("ab", "ab")
    assert text_delta("ab", "abé", final=False) == ("é", "abé")
    assert text_delta("ab", "ab\ufffd", final=True) == ("\ufffd", "ab\ufffd")
    assert text_delta("abc", "xbc", final=True) == ("", "abc")  # rewritten: text is final


# -- ShardBackend over a scripted ShardService (no torch, no peers) -------------------------


class ScriptedShards(ShardService):
    """Model "missing" is announced by no one, "bug" raises, "hang" stops after a token."""

    def __init__(self, nursery: trio.Nursery) -> None:
        unused: Any = SimpleNamespace()  # the backend uses only the nursery
        super().__init__(
            ident=unused,
            net=unused,
            replica=unused,
            replicator=unused,
            metrics=unused,
            allow_remote_deploy=False,
            nursery=nursery,
        )
        self.finished = trio.Event()
        self.started: list[Job] = []
        self.job_ids: list[bytes | None] = []  # what each generate() was given

    def announced(self, model_id: str) -> list[dict[str, Any]]:
        if model_id == "missing":
            return []
        return [{"peer_id": "p1", "start": 0, "end": 4, "ms_per_layer": 1.0}]

    async def generate(
        self,
        job: Job,
        model_id: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        *,
        temperature: float,
        seed: int | None,
        job_id: bytes | None = None,
    ) -> Job:
        self.started.append(job)
        self.job_ids.append(job_id)
        try:  # like ShardService.generate: the job is done however this ends
            if model_id == "bug":
                raise ValueError("bad tensor")
            if model_id == "full":  # as the client reports servers refusing a session
                job.fail("p1: busy: 32 sessions of this peer are open", errors.Busy)
                return job
            job.route = [{"peer_id": "p1", "start": 0, "end": 4}]
            for token in expected_tokens(prompt_ids, max_new_tokens, seed):
                job.tokens.append(token)
                job.text = bytes(job.tokens).decode()
                if model_id == "hang":
                    await trio.sleep_forever()
                await trio.lowlevel.checkpoint()
        finally:
            job.done, job.finished = True, time.time()
            self.finished.set()
        return job


def shard_backend(nursery: trio.Nursery) -> ShardBackend:
    return ShardBackend(ScriptedShards(nursery))


async def test_a_paid_generation_passes_its_job_id_on_to_the_shard_service() -> None:
    job_id = "ab" * 32
    async with serving(shard_backend) as served:
        paid = dict(model="m", token_ids=pb2.TokenIds(ids=[9, 9]), max_tokens=2, job_id=job_id)
        replies = await in_thread(lambda: generate(served, **paid))
        await in_thread(
            lambda: generate(served, model="m", token_ids=pb2.TokenIds(ids=[9]), max_tokens=1)
        )
    assert replies[-1].done and replies[-1].n_tokens == 2
    shards = served.backend.service
    assert shards.job_ids == [bytes.fromhex(job_id), None]  # free work: no job named


async def test_shard_backend_streams_a_generation() -> None:
    async with serving(shard_backend) as served:
        replies = await in_thread(
            lambda: generate(served, model="m", token_ids=pb2.TokenIds(ids=[9, 9]), max_tokens=6)
        )
    expected = expected_tokens([9, 9], 6, None)
    assert [r.token_id for r in replies[:-1]] == expected
    final = replies[-1]
    assert final.done and final.text == bytes(expected).decode() and final.n_tokens == 6
    assert [(h.peer_id, h.start, h.end) for h in final.route] == [("p1", 0, 4)]


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"model": "missing", "text": "hi"}, grpc.StatusCode.NOT_FOUND, "no server announces"),
        ({"model": "m", "text": "hi"}, grpc.StatusCode.FAILED_PRECONDITION, "no tokenizer"),
        (
            {"model": "bug", "token_ids": pb2.TokenIds(ids=[1])},
            grpc.StatusCode.ABORTED,
            "internal error: ValueError: bad tensor",
        ),
        (
            {"model": "full", "token_ids": pb2.TokenIds(ids=[1])},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "busy",
        ),
    ],
)
async def test_shard_backend_maps_errors(
    fields: dict[str, Any], status: grpc.StatusCode, message: str
) -> None:
    async with serving(shard_backend) as served:
        error = await in_thread(failure, lambda: generate(served, **fields))
    assert error.code() == status and message in error.details()


async def test_shard_backend_cancels_an_abandoned_generation() -> None:
    async with serving(shard_backend) as served:
        call = served.stub.Generate(
            pb2.GenerateRequest(model="hang", token_ids=pb2.TokenIds(ids=[1]), max_tokens=5),
            timeout=DEADLINE,
        )
        await in_thread(next, call)
        call.cancel()
        with trio.fail_after(DEADLINE):
            await served.backend.service.finished.wait()
        (job,) = served.backend.service.started
        with trio.fail_after(DEADLINE):
            while job.error is None:  # set right after generate() returns
                await trio.lowlevel.checkpoint()
        assert job.done and job.error == "cancelled"
        assert served.backend.service.jobs == {}  # cancelled: forgotten at once


def test_generated_modules_are_current(tmp_path: Path) -> None:
    """The committed *_pb2* files are what generate.sh makes of the .proto today."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    root = Path(__file__).resolve().parents[2]
    proto = "daemon/api/proto/gridmesh_inference.proto"
    out = f"{tmp_path}"
    args = ["protoc", "-I", str(root), f"--python_out={out}", f"--grpc_python_out={out}"]
    assert protoc.main([*args, f"--pyi_out={out}", str(root / proto)]) == 0
    for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
        name = f"gridmesh_inference{suffix}"
        made = (tmp_path / "daemon/api/proto" / name).read_text()
        assert made == (root / "daemon/api/proto" / name).read_text(), f"run generate.sh: {name}"


# -- authentication and per-connection caps (issue 12 item 8) -------------------------------


def own_connection(port: int, token: str | None = TOKEN) -> grpc.Channel:
    """A channel on its own TCP connection (grpc shares one per target by default), as a
    second client process would have."""
    channel = grpc.insecure_channel(
        f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    return channel if token is None else grpc.intercept_channel(channel, _Bearer(token))


@pytest.mark.parametrize("token", [None, "wrong-token", ""], ids=["none", "wrong", "empty"])
async def test_inference_without_the_cookie_is_unauthenticated(token: str | None) -> None:
    async with serving() as served:
        channel = own_connection(served.port, token)
        stub = pb2_grpc.InferenceStub(channel)
        request = pb2.GenerateRequest(model="m", token_ids=pb2.TokenIds(ids=[1]))
        gen = await in_thread(failure, lambda: list(stub.Generate(request, timeout=DEADLINE)))
        fwd = await in_thread(
            failure,
            lambda: stub.Forward(pb2.ForwardRequest(model="m", token_ids=[1]), timeout=DEADLINE),
        )
        # health checks stay open, so do not need the cookie
        health = health_pb2_grpc.HealthStub(channel)
        ok = await in_thread(
            lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
        )
        channel.close()
    assert gen.code() == grpc.StatusCode.UNAUTHENTICATED and "rpc.cookie" in gen.details()
    assert fwd.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    assert served.backend.requests == []  # nothing reached the backend
    assert served.rejects == ["unauthenticated", "unauthenticated"]


async def test_200_streams_on_one_connection_leave_others_served() -> None:
    async with serving() as served:
        request = pb2.GenerateRequest(model="slow", token_ids=pb2.TokenIds(ids=[4]), max_tokens=3)
        calls = [served.stub.Generate(request, timeout=DEADLINE) for _ in range(200)]

        def first(call: Any) -> Any:
            try:
                return next(call)
            except grpc.RpcError as exc:
                return exc

        firsts = await in_thread(lambda: [first(c) for c in calls])
        refused = [f for f in firsts if isinstance(f, grpc.RpcError)]
        running = [f for f in firsts if not isinstance(f, grpc.RpcError)]
        # another client, on its own connection, is served at once
        honest = own_connection(served.port)
        stub = pb2_grpc.InferenceStub(honest)
        fast = pb2.GenerateRequest(model="m", token_ids=pb2.TokenIds(ids=[1]), max_tokens=2)
        replies = await in_thread(lambda: list(stub.Generate(fast, timeout=DEADLINE)))
        honest.close()
        served.backend.release.set()
        live = [c for c, f in zip(calls, firsts, strict=True) if not isinstance(f, grpc.RpcError)]
        rest = await in_thread(lambda: [list(c) for c in live])
    assert len(running) == MAX_RPCS_PER_PEER and len(refused) == 200 - MAX_RPCS_PER_PEER
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert all("busy" in r.details() for r in refused)
    assert served.rejects == ["busy"] * len(refused)
    assert replies[-1].done and replies[-1].n_tokens == 2
    assert len(set(served.backend.owners)) == 2  # the requester is the connection
    assert sum(1 for r in rest if r and r[-1].done) == MAX_RPCS_PER_PEER


async def test_finished_generations_are_forgotten_once_read() -> None:
    # 64 generations used to fill the job table for 10 minutes: the 65th was refused
    async with serving(shard_backend) as served:
        for i in range(3 * MAX_JOBS):
            request = pb2.GenerateRequest(model="m", token_ids=pb2.TokenIds(ids=[i]), max_tokens=2)
            replies = await in_thread(
                lambda request=request: list(served.stub.Generate(request, timeout=DEADLINE))
            )
            assert replies[-1].done and replies[-1].n_tokens == 2
        assert served.backend.service.jobs == {}


async def test_over_the_total_cap_generations_are_busy_not_another_error() -> None:
    async with serving(shard_backend) as served:
        request = pb2.GenerateRequest(model="hang", token_ids=pb2.TokenIds(ids=[1]), max_tokens=3)
        channels = [own_connection(served.port) for _ in range(MAX_JOBS // MAX_RPCS_PER_PEER + 1)]
        calls = [
            pb2_grpc.InferenceStub(channel).Generate(request, timeout=DEADLINE)
            for channel in channels
            for _ in range(MAX_RPCS_PER_PEER)
        ]

        def first(call: Any) -> Any:
            try:
                return next(call)
            except grpc.RpcError as exc:
                return exc

        firsts = await in_thread(lambda: [first(c) for c in calls])
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    refused = [f for f in firsts if isinstance(f, grpc.RpcError)]
    assert len(refused) == len(calls) - MAX_JOBS
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert all(r.details().startswith("busy") for r in refused)


def test_forward_maps_busy_servers_to_resource_exhausted() -> None:
    pytest.importorskip("torch")
    from daemon.shards.client import GenerationError, RequestRefused, ServersBusyError

    assert forward_error_code(ServersBusyError("busy: all full")) == "resource_exhausted"
    assert forward_error_code(RequestRefused("p1 refused: bad shape")) == "invalid_argument"
    assert forward_error_code(GenerationError("no route")) == "unavailable"
