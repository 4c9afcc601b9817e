"""Serving benchmark: the OpenAI-compatible endpoint under 1..32 concurrent streams.

Makes a random Llama-shaped checkpoint (hidden 2048, 8 layers, float32 by default: the
issue's CPU shape), starts daemons with the endpoint on (`[serving] openai = true`), deploys
the model over 1 and over 4 of them (contiguous ranges), and drives `POST /v1/completions`
over HTTP with `stream: true` from as many client threads as there are concurrent streams.
Every request asks for `--tokens` new tokens greedily, with the eos and bos tokens banned by
`logit_bias` so that a random model cannot stop early, and a prompt of its own. Per row:
- aggregate tokens/s: all completion tokens of the row / the row's wall time;
- time to first token (TTFT) p50/p99: from sending the request to its first text chunk;
- inter-token latency (ITL) p50/p99: between a stream's consecutive text chunks (a chunk may
  carry more than one token when the detokenizer held back an incomplete piece: the gap is
  then divided by its tokens);
- rows/pass: the sessions' steps per forward pass over every daemon of the row, from their
  `gridmesh_shard_batch_size` histograms (how well continuous batching packs the streams).
The baseline is one process of Hugging Face transformers doing the same requests one at a
time (a KV-cached greedy loop, as `bench/inference.py` measures it).
Targets on the CPU: 8 concurrent streams give >= 3x the aggregate tokens/s of 1 stream, and
4 daemons with 8 streams give >= 2.5x one process of transformers.

usage: python bench/serving.py [--hidden 2048] [--layers 8] [--daemons 1 4]
       [--streams 1 4 8 16 32] [--prompt-tokens 16] [--tokens 32] [--device cpu|cuda]
       [--pipeline] [--batched-layout] [--batch-window S]
smallest (a check that it runs): python bench/serving.py --hidden 64 --layers 4
       --daemons 1 2 --streams 1 4 --tokens 8 --no-hf
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # don't let bench/ shadow packages

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import torch  # noqa: E402

from bench.inference import config_text, deploy, make_checkpoint, synchronize  # noqa: E402
from daemon.devnet import Devnet, wait_for  # noqa: E402
from daemon.shards.model.tokenizer import BYTE_BOS_ID, BYTE_EOS_ID  # noqa: E402

MODEL = "m"


@dataclass
class Stream:
    """What one streamed completion measured."""

    ttft_s: float = float("nan")
    gaps_s: list[float] = field(default_factory=list)  # per token, between text chunks
    tokens: int = 0
    error: str | None = None


def prompt_text(index: int, tokens: int) -> str:
    """A prompt of its own per stream (the byte tokenizer: one token per ASCII char)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return "".join(alphabet[(index * 7 + i) % 26] for i in range(tokens - 1)) + " "


def completion(url: str, index: int, args: argparse.Namespace) -> Stream:
    """One streamed `/v1/completions` over its own connection."""
    parts = urlsplit(url)
    body = {
        "model": MODEL,
        "prompt": prompt_text(index, args.prompt_tokens),
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(BYTE_EOS_ID): -100, str(BYTE_BOS_ID): -100},
    }
    out = Stream()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        sent = time.perf_counter()
        conn.request(
            "POST",
            f"{parts.path.rstrip('/')}/completions",
            json.dumps(body),
            {"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        if response.status != 200:
            out.error = f"HTTP {response.status}: {response.read()[:300]!r}"
            return out
        last = sent
        chunks = 0
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if not choices or not choices[0].get("text"):
                continue
            chunks += 1
            if chunks == 1:
                out.ttft_s = now - sent
            else:
                out.gaps_s.append(now - last)
            last = now
        if out.tokens > chunks > 1:  # chunks holding several tokens: spread their gaps
            scale = (chunks - 1) / (out.tokens - 1)
            out.gaps_s = [g * scale for g in out.gaps_s]
    except Exception as exc:  # reported in the table, not a crash of the bench
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return out


def run_level(url: str, streams: int, args: argparse.Namespace) -> tuple[float, list[Stream]]:
    """`streams` concurrent completions; (wall seconds, each stream's measures)."""
    results: list[Stream] = [Stream() for _ in range(streams)]

    def one(i: int) -> None:
        results[i] = completion(url, i, args)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Row:
    setup: str
    streams: int
    tokens_per_s: float
    ttft: list[float]
    itl: list[float]
    errors: list[str]
    rows_per_pass: float = float("nan")  # sessions' steps per forward pass, over every daemon


def summarise(setup: str, streams: int, wall_s: float, results: list[Stream]) -> Row:
    ok = [r for r in results if r.error is None]
    return Row(
        setup,
        streams,
        sum(r.tokens for r in ok) / wall_s,
        [r.ttft_s for r in ok],
        [g for r in ok for g in r.gaps_s],
        [r.error for r in results if r.error],
    )


def transformers_rows(model_dir: Path, args: argparse.Namespace, dtype: str) -> Row:
    """Hugging Face transformers in this process, the requests one at a time."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from daemon.serving.text import ModelText

    hf_logging.set_verbosity_error()
    text = ModelText.load(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(args.device).eval()
    banned = [BYTE_EOS_ID, BYTE_BOS_ID]
    ttft, itl, total = [], [], 0
    requests = max(args.streams)
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(requests):
            prompt = text.encode(prompt_text(i, args.prompt_tokens))
            ids = torch.tensor([prompt], device=args.device)
            sent = last = time.perf_counter()
            out = model(ids, use_cache=True)
            for step in range(args.tokens):
                logits = out.logits[0, -1]
                logits[banned] = float("-inf")
                token = logits.argmax()
                synchronize(args.device)
                now = time.perf_counter()
                if step == 0:
                    ttft.append(now - sent)
                else:
                    itl.append(now - last)
                last = now
                total += 1
                if step + 1 < args.tokens:
                    out = model(
                        token.view(1, 1), past_key_values=out.past_key_values, use_cache=True
                    )
    return Row(
        "transformers, one at a time", 1, total / (time.perf_counter() - started), ttft, itl, []
    )


def serving_config(args: argparse.Namespace) -> str:
    text = config_text(args.threads, args.device, local_sockets=True)
    if "pipeline = false" not in text:
        raise RuntimeError("configs/devnet.toml no longer has 'pipeline = false'")
    if args.pipeline:  # configs/devnet.toml turns it off: its daemons share one machine
        text = text.replace("pipeline = false", "pipeline = true")
    if args.batched_layout:  # in the same [shards] table
        text = text.replace("pipeline = ", "batched_layout = true\npipeline = ")
    if args.batch_window is not None:
        text = text.replace("pipeline = ", f"batch_window_s = {args.batch_window}\npipeline = ")
    return text + "\n[serving]\nopenai = true\nport = 0\n"


def bench_daemons(
    n: int, root: Path, model_dir: Path, shape: dict, args: argparse.Namespace
) -> list[Row]:
    config = root / f"serving{n}.toml"
    config.write_text(serving_config(args))
    rows = []
    with Devnet(n, root=root / f"net{n}", config=config) as net:
        net.wait_all_found(60)
        front = net.daemons[0]
        deploy(front, net.daemons, model_dir, shape["layers"], shape["dtype"])
        url = front.info.get("openai_url")
        if not url:
            raise RuntimeError(f"daemon 0 reports no openai_url: {front.info}")
        wait_for(lambda: completion(url, 0, args).error is None, 120, "a first completion")
        for streams in args.streams:
            print(f"{n} daemon(s), {streams} stream(s) ...", file=sys.stderr, flush=True)
            before = passes(net.daemons)
            wall_s, results = run_level(url, streams, args)
            row = summarise(f"gridmesh, {n} daemon(s)", streams, wall_s, results)
            steps, count = (a - b for a, b in zip(passes(net.daemons), before, strict=True))
            row.rows_per_pass = steps / count if count else float("nan")
            rows.append(row)
    return rows


def passes(daemons: list) -> tuple[float, float]:
    """(steps, forward passes) the daemons' shard servers ran so far (their /metrics)."""
    name = "gridmesh_shard_batch_size"
    steps = sum(d.metric(f"{name}_sum") for d in daemons)
    return steps, sum(d.metric(f"{name}_count") for d in daemons)


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'setup':>28} | {'streams':>7} | {'tokens/s':>8} | {'TTFT p50':>8} | "
        f"{'TTFT p99':>8} | {'ITL p50':>8} | {'ITL p99':>8} | {'rows/pass':>9} | errors"
    )
    print(header)
    print("-" * len(header))
    ms = 1000.0
    for r in rows:
        print(
            f"{r.setup:>28} | {r.streams:>7} | {r.tokens_per_s:>8.2f} | "
            f"{percentile(r.ttft, 0.5) * ms:>6.0f}ms | {percentile(r.ttft, 0.99) * ms:>6.0f}ms | "
            f"{percentile(r.itl, 0.5) * ms:>6.1f}ms | {percentile(r.itl, 0.99) * ms:>6.1f}ms | "
            f"{r.rows_per_pass:>9.2f} | "
            f"{len(r.errors)}{' (' + r.errors[0][:60] + ')' if r.errors else ''}"
        )


def check_targets(rows: list[Row]) -> list[str]:
    """The issue's CPU targets, as lines saying met or NOT met."""
    lines = []
    by = {(r.setup, r.streams): r for r in rows}
    for setup in sorted({r.setup for r in rows if r.setup.startswith("gridmesh")}):
        one, eight = by.get((setup, 1)), by.get((setup, 8))
        if one and eight and one.tokens_per_s > 0:
            ratio = eight.tokens_per_s / one.tokens_per_s
            met = "met" if ratio >= 3 else "NOT met"
            lines.append(f"{setup}: 8 streams = {ratio:.2f}x 1 stream (target >= 3x): {met}")
    hf = next((r for r in rows if r.setup.startswith("transformers")), None)
    four = by.get(("gridmesh, 4 daemon(s)", 8))
    if hf and four:
        ratio = four.tokens_per_s / hf.tokens_per_s
        met = "met" if ratio >= 2.5 else "NOT met"
        lines.append(f"4 daemons, 8 streams = {ratio:.2f}x transformers (target >= 2.5x): {met}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--daemons", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per daemon")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--pipeline",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="micro-batches across the hops ([shards] pipeline); off by default, since the "
        "daemons share this machine's cores",
    )
    parser.add_argument(
        "--batched-layout",
        action="store_true",
        help="[shards] batched_layout: CPU weights in oneDNN's layout for batched products",
    )
    parser.add_argument(
        "--batch-window", type=float, default=None, help="[shards] batch_window_s (s)"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.preset = "cpu"
    args.family, args.sliding_window = "llama", None  # what bench/inference.make_checkpoint reads
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gridmesh-serving-") as tmp:
        root = Path(tmp)
        print("writing a random checkpoint ...", file=sys.stderr, flush=True)
        model_dir, shape = make_checkpoint(root, args)
        print(
            f"model: hidden {shape['hidden']}, {shape['layers']} layers, {shape['dtype']}, on "
            f"{args.device}; prompt {args.prompt_tokens} tokens, {args.tokens} new per request",
            file=sys.stderr,
        )
        if args.hf:
            print("transformers ...", file=sys.stderr, flush=True)
            rows.append(transformers_rows(model_dir, args, shape["dtype"]))
        for n in args.daemons:
            rows.extend(bench_daemons(n, root, model_dir, shape, args))
    print_table(rows)
    for line in check_targets(rows):
        print(line)
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
