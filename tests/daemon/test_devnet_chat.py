"""`make devnet`'s chat demo (daemon.devnet_chat) against a stand-in endpoint in this process:
it reads a streamed reply piece by piece, and an error, a broken stream or an empty reply
makes it fail (the devnet then exits non-zero). The real endpoint: test_devnet_procs.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daemon.devnet.chat import chat_demo, serving_toml, shown, stream_chat
from daemon.settings import parse


def _events(*chunks: dict) -> bytes:
    lines = [b": keep-alive\n\n", *(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)]
    return b"".join(lines)


def _delta(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


REPLY = (
    _events(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        _delta("hel"),
        _delta("lo\n", "length"),
        {"choices": [], "usage": {"completion_tokens": 2}},
    )
    + b"data: [DONE]\n\n"
)


@pytest.fixture
def endpoint() -> Iterator[tuple[str, dict]]:
    """A server answering POST /v1/chat/completions with `answer` (status, body)."""
    answer: dict = {"status": 200, "body": REPLY, "seen": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers["Content-Length"])
            answer["seen"].append((self.path, json.loads(self.rfile.read(length))))
            self.send_response(answer["status"])
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", answer
    finally:
        server.shutdown()
        server.server_close()


def test_a_streamed_reply_arrives_piece_by_piece(endpoint):
    url, answer = endpoint
    pieces: list[str] = []
    result = stream_chat(url, "tiny", "hi", 8, pieces.append)
    assert pieces == ["hel", "lo\n"]
    assert result == {
        "text": "hello\n",
        "finish_reason": "length",
        "usage": {"completion_tokens": 2},
    }
    path, body = answer["seen"][0]
    assert path == "/v1/chat/completions"
    assert body["stream"] is True and body["model"] == "tiny" and body["max_tokens"] == 8
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert shown("lo\n\x02") == "lo\\n\\x02"


@pytest.mark.parametrize(
    "status, body",
    [
        (404, b'{"error": {"message": "The model `tiny` does not exist"}}'),
        (200, _events(_delta("he"))),  # no [DONE]: the stream broke
        (200, _events({"error": {"message": "shard server lost"}}) + b"data: [DONE]\n\n"),
        (200, _events(_delta("", "stop")) + b"data: [DONE]\n\n"),  # an empty reply
    ],
)
def test_the_demo_fails_on_an_error_a_broken_stream_or_an_empty_reply(
    endpoint, capsys, status, body
):
    url, answer = endpoint
    answer["status"], answer["body"] = status, body
    assert chat_demo(url, "tiny") is False
    assert "the chat FAILED" in capsys.readouterr().out


def test_the_demo_fails_when_nothing_listens():
    assert chat_demo("http://127.0.0.1:1/v1", "tiny") is False
    assert chat_demo("", "tiny") is False  # node0 reported no openai_url


def test_node0s_serving_table_is_a_valid_config(tmp_path):
    import tomllib

    from daemon.devnet import DEVNET_CONFIG

    text = DEVNET_CONFIG.read_text() + serving_toml("tiny", tmp_path / 'a "dir"')
    serving = parse(tomllib.loads(text)).serving
    assert serving.openai and serving.host == "127.0.0.1" and serving.port == 0
    assert not serving.keys_required
    assert serving.model_dirs == {"tiny": str(tmp_path / 'a "dir"')}
