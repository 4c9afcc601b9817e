"""`make devnet`'s last demo: one streamed chat through node0's OpenAI-compatible endpoint.

node0 alone serves `[serving] openai` (on loopback, a free port); the others do not, so the
demo shows that a node holding no shard of the model serves it to an OpenAI client. The chat
goes over plain HTTP with the standard library (what any client sends: `POST
/v1/chat/completions` with `stream: true`, read as server-sent events), and the devnet then
prints how to point the official `openai` client and curl at the same URL.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PROMPT = "Say hello to the gridmesh devnet."


def serving_toml(model: str, model_dir: Path) -> str:
    """The `[serving]` table node0 gets on top of configs/devnet.toml: the endpoint on
    loopback at a free port, and where the model's tokenizer is (node0 may hold no shard)."""
    return (
        "\n# added by `make devnet` for node0 only: the OpenAI-compatible endpoint\n"
        "[serving]\n"
        "openai = true\n"
        'host = "127.0.0.1"\n'
        "port = 0\n"
        f"model_dirs = {{ {json.dumps(model)} = {json.dumps(str(model_dir))} }}\n"
    )


def shown(text: str) -> str:
    """`text` on one line: control characters escaped (a random model's reply has some)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


class ChatFailed(RuntimeError):
    pass


def stream_chat(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    on_text: Callable[[str], None],
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """One streamed `POST {url}/chat/completions`; calls `on_text` with each piece of the
    reply as it arrives. Returns {"text", "finish_reason", "usage"}; raises ChatFailed with
    the endpoint's error (or the transport's) otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ChatFailed(f"not an http://host:port/v1 URL: {url!r}")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request(
            "POST",
            parts.path.rstrip("/") + "/chat/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", "Authorization": "Bearer devnet"},
        )
        response = conn.getresponse()
        if response.status != 200:
            raise ChatFailed(
                f"HTTP {response.status}: {response.read(4096).decode(errors='replace')}"
            )
        return _read_events(response, on_text)
    except (OSError, http.client.HTTPException) as exc:
        raise ChatFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def _read_events(
    response: http.client.HTTPResponse, on_text: Callable[[str], None]
) -> dict[str, Any]:
    """The server-sent events of a streamed chat, up to `data: [DONE]`."""
    text: list[str] = []
    finish: str | None = None
    usage: dict[str, Any] | None = None
    while True:
        line = response.readline()
        if not line:
            raise ChatFailed("the stream ended before data: [DONE]")
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise ChatFailed(f"a chunk that is not JSON: {data[:200]!r}") from exc
        if "error" in chunk:
            raise ChatFailed(f"error mid-stream: {chunk['error']}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                text.append(piece)
                on_text(piece)
            finish = choice.get("finish_reason") or finish
    return {"text": "".join(text), "finish_reason": finish, "usage": usage}


def chat_demo(url: str, model: str, max_tokens: int = 24) -> bool:
    """Print a streamed chat with `model` through the endpoint at `url` as it arrives.
    Returns whether it gave a non-empty reply."""
    print(f"node0 serves the OpenAI-compatible endpoint at {url} (loopback only)")
    print(f"POST {url}/chat/completions (stream) to {model!r}: {PROMPT!r}")
    print("reply (streamed): ", end="", flush=True)
    started = time.monotonic()
    try:
        result = stream_chat(
            url, model, PROMPT, max_tokens, lambda p: print(shown(p), end="", flush=True)
        )
    except ChatFailed as exc:
        print(f"\nthe chat FAILED: {exc}")
        return False
    print()
    tokens = (result["usage"] or {}).get("completion_tokens", "?")
    print(
        f"streamed {tokens} tokens in {time.monotonic() - started:.2f} s "
        f"(finish_reason {result['finish_reason']}; a random tiny model: bytes, not words)"
    )
    if not result["text"]:
        print("the chat FAILED: an empty reply")
        return False
    return True


def print_client_example(url: str, model: str) -> None:
    """How to talk to the endpoint while the devnet runs: the `openai` client and curl."""
    print("while the devnet runs, point the official openai client (pip install openai) at it:")
    print("  from openai import OpenAI")
    print(f'  client = OpenAI(base_url="{url}", api_key="any string on loopback")')
    print(
        f'  reply = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello"}], max_tokens=16)'
    )
    print("  print(reply.choices[0].message.content)")
    print("or curl:")
    print(
        f"  curl -N {url}/chat/completions -H 'Content-Type: application/json' -d "
        f'\'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], '
        '"max_tokens": 16, "stream": true}\''
    )
