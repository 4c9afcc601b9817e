"""Raw HTTP to a whole daemon's OpenAI endpoint on the in-memory network: each request is a
connection over an in-memory stream served by the daemon's own `OpenAIServer`
(`daemon.openai.handle_connection`), spoken with h11 as a client would."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
import trio.testing

from tests.daemon.harness import FAST, memory_cluster

LAYERS = 6
EOS = 257  # the tiny checkpoint's eos id
NO_EOS = {"logit_bias": {str(EOS): -100}}  # long generations: the tiny model may end early
# a chat template in the tokenizer_config.json of the tiny checkpoint (it ships none)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SERVING = {**FAST, "serving": {"openai": True}}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    events: list[Any] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


def tiny_with_template(root: Path) -> Path:
    from daemon.shards.model import make_tiny

    model_dir = make_tiny(root / "tiny", layers=LAYERS, seed=7)
    config = {
        "chat_template": TEMPLATE,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


@asynccontextmanager
async def serving_cluster(
    root: Path, model_dir: Path, count: int = 3, holders: int | None = None
) -> AsyncIterator[Any]:
    """`count` whole daemons with the endpoint on, the tiny model split over the first
    `holders` of them (all by default)."""
    async with memory_cluster(root, count, settings=SERVING) as net:
        holders = holders or count
        step = LAYERS // holders
        plan = [
            {
                "peer_id": d.peer_id,
                "start": i * step,
                "end": LAYERS if i == holders - 1 else (i + 1) * step,
            }
            for i, d in enumerate(net.daemons[:holders])
        ]
        result = await net.daemons[0].call(
            "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": plan}
        )
        assert all(r["ok"] for r in result["results"]), result

        async def everyone_sees_every_shard() -> bool:
            for d in net.daemons:
                listed = await d.call("block_list", {"model": "tiny"})
                if len(listed["announced"].get("tiny", [])) != holders:
                    return False
            return True

        await net.wait_for(everyone_sees_every_shard, 15, "every daemon to see every shard")
        yield net


def connect(server: Any, nursery: trio.Nursery, *, lockstep: bool = False) -> Any:
    """A client stream to `server` (an OpenAIServer), served in `nursery`. `lockstep`: no
    buffering at all (a client that does not read blocks the server's writes)."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client, served = pair()
    nursery.start_soon(server.handle_connection, served, "127.0.0.1:40000")
    return client


class Client:
    """One HTTP/1.1 connection, h11 on the client side."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body or b""
        head = [("host", "gridmesh"), ("content-length", str(len(raw)))]
        if body is not None:
            head.append(("content-type", "application/json"))
        head += list((headers or {}).items())
        out = self.conn.send(h11.Request(method=method, target=path, headers=head))
        out += self.conn.send(h11.Data(data=raw)) if raw else b""
        out += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(out)

    async def event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def head(self) -> Reply:
        event = await self.event()
        assert isinstance(event, h11.Response), event
        headers = {k.decode(): v.decode() for k, v in event.headers}
        return Reply(event.status_code, headers)

    async def rest(self, reply: Reply) -> Reply:
        while True:
            event = await self.event()
            if isinstance(event, h11.Data):
                reply.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        if reply.headers.get("content-type", "").startswith("text/event-stream"):
            reply.events = sse(reply.body)
        return reply

    async def next_sse(self, reply: Reply) -> Any:
        """The next server-sent event of a streamed reply (its JSON, or "[DONE]")."""
        while b"\n\n" not in reply.body:
            event = await self.event()
            assert isinstance(event, h11.Data), event
            reply.body += bytes(event.data)
        one, reply.body = reply.body.split(b"\n\n", 1)
        return _data(one)


def sse(body: bytes) -> list[Any]:
    """The events of an SSE body: each `data: ...` record, JSON decoded, "[DONE]" as is."""
    assert body.endswith(b"\n\n"), body[-200:]
    return [_data(record) for record in body.split(b"\n\n")[:-1]]


def _data(record: bytes) -> Any:
    assert record.startswith(b"data: "), record[:200]
    payload = record[len(b"data: ") :]
    return "[DONE]" if payload == b"[DONE]" else json.loads(payload)


async def request(
    server: Any,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on a fresh connection, its whole reply."""
    async with trio.open_nursery() as nursery:
        client = Client(connect(server, nursery))
        await client.send(method, path, body, headers)
        reply = await client.rest(await client.head())
        await client.stream.aclose()
    return reply


def streamed_text(events: list[Any], index: int = 0, chat: bool = True) -> str:
    out = ""
    for event in events:
        if event == "[DONE]" or "error" in event:
            continue
        for choice in event["choices"]:
            if choice["index"] == index:
                out += (choice["delta"].get("content") or "") if chat else choice["text"]
    return out


def sessions(net: Any) -> int:
    """Sessions open on every shard server of the cluster."""
    return sum(len(d.daemon.shards.server.sessions) for d in net.daemons)
