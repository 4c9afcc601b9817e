"""The OpenAI endpoint's streamed replies (daemon.api.openai_http): the chunk documents OpenAI's
clients read, and `EventStream`, which writes them as server-sent events on one connection.

A streamed request that has to wait for a generation slot is told its place in the queue
while it waits, as SSE comment lines `: queued position=N` (N = 1: next in line). The SSE
spec has clients skip a line that starts with ":", and OpenAI's clients do (openai-python's
`SSEDecoder`), so a client that knows nothing of them reads the same stream. The response
head goes out with the first notice; a request that never waits gets none.
"""

from __future__ import annotations

import math
from typing import Any

import h11
import msgspec
import trio

from daemon.api.httpio import Response, response_head, send_all
from daemon.serving import openai_wire as wire
from daemon.serving.engine import Piece
from daemon.serving.openai_wire import OpenAIError

SSE = b"text/event-stream"
QUEUE_NOTICE_S = 1.0  # a changed position is sent at most this often
QUEUE_KEEPALIVE_S = 15.0  # an unchanged one is sent again this often (so proxies keep it)


class EventStream:
    """One streamed reply: its head (sent once, with the first bytes), `data:` events
    gathered until `flush` writes them in one write, and queue notices."""

    def __init__(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        *,
        notice_s: float = QUEUE_NOTICE_S,
        keepalive_s: float = QUEUE_KEEPALIVE_S,
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.notice_s = notice_s
        self.keepalive_s = keepalive_s
        self.started = False  # the head is out: errors now go in the stream
        self.notices = 0
        self._out: list[bytes] = []
        self._position: int | None = None
        self._told_at = -math.inf

    def event(self, doc: Any) -> None:
        self._out.append(b"data: " + msgspec.json.encode(doc) + b"\n\n")

    def error(self, error: OpenAIError) -> None:
        self.event({"error": error_doc(error)})

    async def flush(self, *, end: bool = False) -> None:
        """Write the head (the first time) and every event gathered, in one write; `end`:
        `data: [DONE]` and the end of the reply with them (so the reply is whole once this
        one write is done)."""
        data = b""
        if not self.started:
            self.started = True
            extra = [(b"x-accel-buffering", b"no")]
            data = response_head(self.conn, Response(200, content_type=SSE, extra=extra), None)
        if end:
            self._out.append(b"data: [DONE]\n\n")
        if self._out:
            data += self.conn.send(h11.Data(data=b"".join(self._out))) or b""
            self._out.clear()
        if end:
            data += self.conn.send(h11.EndOfMessage()) or b""
        await send_all(self.stream, data)

    async def queued(self, position: int) -> None:
        """The queue's `on_wait` (daemon.serving.admission): send the position when it
        changed, at most every `notice_s`, and an unchanged one every `keepalive_s`."""
        since = trio.current_time() - self._told_at
        if since < self.notice_s or (position == self._position and since < self.keepalive_s):
            return
        self._position, self._told_at = position, trio.current_time()
        self.notices += 1
        self._out.append(b": queued position=%d\n\n" % position)
        await self.flush()


class Chunks:
    """The stream's chunk documents."""

    def __init__(self, ident: str, created: int, model: str, chat: bool) -> None:
        self.ident, self.created, self.model, self.chat = ident, created, model, chat

    def role(self, index: int) -> Any:
        choice = wire.ChunkChoice(index, wire.Delta(role="assistant", content=""), None, None)
        return wire.ChatChunk(self.ident, self.created, self.model, [choice])

    def content(self, piece: Piece, offset: int, logprobs: bool) -> Any:
        if self.chat:
            lp = chat_logprobs(piece.tokens) if logprobs else None
            choice = wire.ChunkChoice(piece.index, wire.Delta(content=piece.text), lp, None)
            return wire.ChatChunk(self.ident, self.created, self.model, [choice])
        clp = completion_logprobs(piece.tokens, offset) if logprobs else None
        one = wire.CompletionChoice(piece.index, piece.text, clp, None)
        return wire.Completion(self.ident, self.created, self.model, [one], None)

    def finish(self, index: int, reason: str) -> Any:
        if self.chat:
            choice = wire.ChunkChoice(index, wire.Delta(), None, reason)
            return wire.ChatChunk(self.ident, self.created, self.model, [choice])
        one = wire.CompletionChoice(index, "", None, reason)
        return wire.Completion(self.ident, self.created, self.model, [one], None)

    def usage(self, used: wire.Usage) -> Any:
        if self.chat:
            return wire.ChatChunk(self.ident, self.created, self.model, [], usage=used)
        return wire.Completion(self.ident, self.created, self.model, [], used)


def error_doc(error: OpenAIError) -> dict[str, Any]:
    return {"message": error.message, "type": error.type, "param": error.param, "code": error.code}


def chat_logprobs(tokens: list[Any]) -> wire.ChatLogprobs:
    return wire.ChatLogprobs(
        [
            wire.TokenLogprob(
                t.token,
                t.logprob,
                list(t.data),
                [wire.TopLogprob(s, lp, list(b)) for s, b, lp in t.top],
            )
            for t in tokens
        ]
    )


def completion_logprobs(tokens: list[Any], offset: int) -> wire.CompletionLogprobs:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return wire.CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{s: lp for s, _, lp in t.top} for t in tokens],
        text_offset=offsets,
    )
