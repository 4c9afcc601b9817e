"""Continuous batching benchmark: aggregate decode tokens/s of 1, 4, 8 and 16 concurrent
generations on one shard server, batched (daemon.shards.batching) and not (`max_batch=1`:
every step alone, as before batching). Two tables.

End to end: one `ShardServer` holds every layer of a random Llama checkpoint (make_tiny,
default hidden 512, 8 layers, 8 heads over 4 kv heads, MLP 1408, float32), served on the
in-memory network (frames cost no latency: what is measured is the server) with real threads
and real time; N clients (`RemoteModel` + `generate`, greedy) each generate `--tokens`
tokens after a prompt of 12..27 tokens, all started at once. Aggregate tokens/s is every
generated token over the wall time from the first open to the last token; ms/token is each
generation's time per token (median). Each batched generation's tokens are checked against
the same generation unbatched.

Kernel (`--kernel`): one decode step of B sessions with `--context` cached positions each,
three ways: B lone steps (`LlamaShard.forward`), one `decode_rows` (what the server runs:
shared matrix products, attention per row over each session's own cache), and the
alternative KV layout, gathering the B caches into one padded tensor per step and one masked
attention (timed by hand here; the server does not use it): it shows what the gathers cost.

Pipeline (`--pipeline`): the checkpoint split over 4 shard servers (`--hops`) on the
in-memory network (`--latency-ms` per frame), N generations at once through the chain,
without pipelining and with it (micro-batches of ceil(N / hops), daemon.shards.batching),
each generation's tokens checked equal. Two tables: real threads and real time (all servers
share this machine's cores: on a 2-core CPU four hops cannot compute at once, so this shows
what pipelining costs here, not what it gains on 4 machines), and virtual time (trio's
MockClock; a forward pass takes `--pass-ms` plus `--row-ms` per position it computes, as a
pass whose rows' arithmetic counts; frames take `--latency-ms`), which shows how the hops'
compute overlaps: the mean number of servers computing, and the share of the time two or more
do.

usage: python bench/batching.py [--hidden 512] [--layers 8] [--tokens 48]
       [--sessions 1 4 8 16] [--threads N] [--kernel] [--context 256] [--device cpu]
       [--linear]  (only the table of the linear kernels: F.linear vs ours)
       [--pipeline [--pipeline-only] [--hops 4] [--latency-ms 1] [--pass-ms 2] [--row-ms 10]]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/registry.py, named like the `registry` package: don't shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import trio  # noqa: E402
import trio.testing  # noqa: E402

from daemon.shards import SHARD_PROTOCOL  # noqa: E402
from daemon.shards.client import RemoteModel, generate  # noqa: E402
from daemon.shards.model import LlamaShard, load_model, make_tiny  # noqa: E402
from daemon.shards.model.layers import rotate_half  # noqa: E402
from daemon.shards.model.linear import linear  # noqa: E402
from daemon.shards.server import ShardServer  # noqa: E402
from p2p.testing.memnet import MemoryNetwork  # noqa: E402
from scheduler.routing import Server  # noqa: E402

TEXT = list(b"continuous batching shares every decode step among the sessions of a server")


def prompt(i: int) -> list[int]:
    return TEXT[i % 7 : i % 7 + 12 + (5 * i) % 16]


async def serve(
    model_dir: Path, layers: int, sessions: int, tokens: int, max_batch: int, device: str
) -> tuple[float, list[float], list[list[int]], dict[int, int]]:
    """Wall seconds, each generation's seconds per token, tokens, batch sizes."""
    hub = MemoryNetwork()
    node, client = hub.add_node("server"), hub.add_node("client")
    server = ShardServer(opener=node, max_batch=max_batch)
    await server.load("m", model_dir, 0, layers, device=device)
    node.set_stream_handler(
        SHARD_PROTOCOL, server.handle_stream, max_frame_bytes=lambda: server.max_frame_bytes
    )

    async def announced() -> list[Server]:
        return [Server("server", 0, layers, ms_per_layer=1.0, rtt_ms=1.0)]

    out: list[list[int]] = [[] for _ in range(sessions)]
    per_token: list[float] = []

    async def one(i: int) -> None:
        model = RemoteModel(client, announced, model_id="m", num_layers=layers, max_length=128)
        await model.open()
        begun = time.perf_counter()
        async for token in generate(model, prompt(i), tokens):
            out[i].append(token)
        per_token.append((time.perf_counter() - begun) / tokens)
        await model.close()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            nursery.start_soon(one, i)
    wall = time.perf_counter() - started
    return wall, per_token, out, server.batching.batch_sizes


def end_to_end(args: argparse.Namespace, model_dir: Path) -> None:
    print(
        f"\nend to end: one server, hidden {args.hidden}, {args.layers} layers, float32, "
        f"{args.tokens} tokens per generation, torch threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()[0]:.1f} at start"
    )
    header = (
        f"{'sessions':>8} | {'alone tok/s':>11} {'ms/token':>8} | {'batched tok/s':>13} "
        f"{'ms/token':>8} | {'speed-up':>8} | {'batch sizes (size: forwards)':<40}"
    )
    print(header)
    print("-" * len(header))
    single: float | None = None
    for n in args.sessions:
        figures = []
        outputs = []
        for max_batch in (1, 32):
            wall, per_token, out, sizes = trio.run(
                serve, model_dir, args.layers, n, args.tokens, max_batch, args.device
            )
            figures.append((n * args.tokens / wall, 1000 * statistics.median(per_token), sizes))
            outputs.append(out)
        if outputs[0] != outputs[1]:
            raise SystemExit(f"{n} sessions: batched tokens differ from unbatched ones")
        (alone, alone_ms, _), (batched, batched_ms, sizes) = figures
        single = single or batched
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))
        print(
            f"{n:>8} | {alone:>11.1f} {alone_ms:>8.1f} | {batched:>13.1f} {batched_ms:>8.1f} "
            f"| {batched / alone:>7.2f}x | {shown[:40]:<40}"
        )
    print(f"load {os.getloadavg()[0]:.1f} at the end")


class Costed:
    """`trio.to_thread.run_sync` for virtual time: a batcher's forward pass runs inline and
    takes `pass_s` plus `row_s` per position of virtual time; the time each server (block)
    computes is recorded as intervals."""

    def __init__(self, pass_s: float, row_s: float) -> None:
        self.pass_s, self.row_s = pass_s, row_s
        self.intervals: dict[int, list[tuple[float, float]]] = {}

    async def run_sync(self, fn, *args, **_):  # type: ignore[no-untyped-def]
        sessions = args[0] if len(args) == 3 and isinstance(args[0], list) else []
        if not sessions or not hasattr(sessions[0], "block"):
            return fn(*args)
        began = trio.current_time()
        await trio.sleep(self.pass_s + self.row_s * sum(x.shape[1] for x in args[1]))
        out = fn(*args)
        spans = self.intervals.setdefault(id(sessions[0].block), [])
        spans.append((began, trio.current_time()))
        return out

    def overlap(self, seconds: float) -> tuple[float, float]:
        """Mean servers computing, and the share of the time two or more compute."""
        events = sorted(
            (t, change)
            for spans in self.intervals.values()
            for a, b in spans
            for t, change in ((a, 1), (b, -1))
        )
        busy = two = 0.0
        now, last = 0, 0.0
        for t, change in events:
            busy += now * (t - last)
            two += (t - last) if now >= 2 else 0.0
            now, last = now + change, t
        return busy / seconds, two / seconds


async def through_chain(
    model_dir: Path, args: argparse.Namespace, sessions: int, pipeline: bool
) -> tuple[float, list[list[int]], list[int]]:
    """N generations at once through `args.hops` servers: seconds from the first step to
    the last token, tokens, the largest batch on each server."""
    hub = MemoryNetwork(latency_s=args.latency_ms / 1000)
    client = hub.add_node("client")
    per = args.layers // args.hops
    servers: list[ShardServer] = []
    ranges = []
    for k in range(args.hops):
        node = hub.add_node(f"h{k}")
        server = ShardServer(opener=node, pipeline=pipeline)
        end = (k + 1) * per if k < args.hops - 1 else args.layers
        await server.load("m", model_dir, k * per, end, device=args.device)
        node.set_stream_handler(
            SHARD_PROTOCOL, server.handle_stream, max_frame_bytes=lambda s=server: s.max_frame_bytes
        )
        servers.append(server)
        ranges.append(Server(f"h{k}", k * per, end, ms_per_layer=1.0, rtt_ms=1.0))

    async def announced() -> list[Server]:
        return ranges

    models = [
        RemoteModel(client, announced, model_id="m", num_layers=args.layers, max_length=128)
        for _ in range(sessions)
    ]
    for model in models:
        await model.open()
    out: list[list[int]] = [[] for _ in range(sessions)]

    async def one(i: int) -> None:
        async for token in generate(models[i], prompt(i), args.tokens):
            out[i].append(token)
        await models[i].close()

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            nursery.start_soon(one, i)
    seconds = trio.current_time() - started
    return seconds, out, [max(s.batching.batch_sizes) for s in servers]


def pipelined(args: argparse.Namespace, model_dir: Path) -> None:
    for virtual in (False, True):
        if virtual:
            print(
                f"\npipeline, virtual time: {args.hops} hops, a pass {args.pass_ms} ms + "
                f"{args.row_ms} ms per position, {args.latency_ms} ms per frame, "
                f"{args.tokens} tokens per generation"
            )
        else:
            print(
                f"\npipeline, real time: {args.hops} hops in this one process, hidden "
                f"{args.hidden}, {args.layers} layers, {args.latency_ms} ms per frame, "
                f"{args.tokens} tokens per generation, torch threads "
                f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load "
                f"{os.getloadavg()[0]:.1f}"
            )
        header = (
            f"{'sessions':>8} | {'unpiped s':>11} {'busy':>5} {'2+':>5} | "
            f"{'pipelined s':>11} {'busy':>5} {'2+':>5} | {'speed-up':>8} | largest batches"
        )
        print(header)
        print("-" * len(header))
        for n in args.sessions:
            row = []
            outs = []
            for pipeline in (False, True):
                costed = Costed(args.pass_ms / 1000, args.row_ms / 1000)
                saved = trio.to_thread.run_sync
                if virtual:
                    trio.to_thread.run_sync = costed.run_sync  # type: ignore[assignment]
                try:
                    clock = trio.testing.MockClock(autojump_threshold=0) if virtual else None
                    seconds, out, largest = trio.run(
                        through_chain, model_dir, args, n, pipeline, clock=clock
                    )
                finally:
                    trio.to_thread.run_sync = saved  # type: ignore[assignment]
                busy, two = costed.overlap(seconds) if virtual else (float("nan"),) * 2
                row.append((seconds, busy, two, largest))
                outs.append(out)
            if outs[0] != outs[1]:
                raise SystemExit(f"{n} sessions: pipelined tokens differ")
            (off, busy0, two0, big0), (on, busy1, two1, big1) = row
            print(
                f"{n:>8} | {off:>11.3f} {busy0:>5.2f} {two0:>5.2f} | {on:>11.3f} {busy1:>5.2f} "
                f"{two1:>5.2f} | {off / on:>7.2f}x | {big0} -> {big1}"
            )
    print(
        "busy: servers computing, on average; 2+: share of the time two or more compute "
        "(virtual time only)"
    )


def gathered_step(shard: LlamaShard, x: torch.Tensor, caches, lengths: list[int]) -> torch.Tensor:
    """The alternative layout, for comparison only: the B caches gathered into one padded
    batch per layer, one masked attention; keys and values of the new position written
    back into each cache."""
    rows = len(caches)
    width = max(lengths) + 1
    pos = torch.tensor([[n] for n in lengths])
    cos, sin = shard.rotary(pos, shard.dtype)
    visible = torch.arange(width)[None, :] <= pos  # [rows, width]
    mask = visible[:, None, None, :]
    hidden = shard.embed_tokens(x) if shard.embed_tokens is not None else x
    for index, layer in enumerate(shard.layers.values()):
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        q = attn.q_proj(normed).view(rows, 1, attn.heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(rows, 1, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(rows, 1, attn.kv_heads, attn.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        for row, (cache, n) in enumerate(zip(caches, lengths, strict=True)):
            cache.keys[index][:, :, n : n + 1] = k[row : row + 1]
            cache.values[index][:, :, n : n + 1] = v[row : row + 1]
        keys = torch.cat([c.keys[index][:, :, :width] for c in caches])  # the gather: a copy
        values = torch.cat([c.values[index][:, :, :width] for c in caches])
        groups = attn.heads // attn.kv_heads
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
        out = attn.o_proj(out.transpose(1, 2).reshape(rows, 1, attn.heads * attn.head_dim))
        hidden = hidden + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return shard.lm_head(shard.norm(hidden)).float()


def kernel(args: argparse.Namespace, model_dir: Path) -> None:
    shard = load_model(model_dir)
    print(
        f"\nkernel: one decode step of B sessions with {args.context} cached positions each "
        f"(hidden {args.hidden}, {args.layers} layers), ms per step (median of {args.repeat})"
    )
    header = f"{'B':>3} | {'B lone steps':>12} | {'decode_rows':>11} | {'gathered':>9}"
    print(header)
    print("-" * len(header))
    for rows in args.sessions:
        caches = [shard.new_cache(max_len=args.context + args.repeat + 4) for _ in range(rows)]
        with torch.inference_mode():
            for cache in caches:
                shard(torch.randint(0, 250, (1, args.context)), cache)
            x = torch.randint(0, 250, (rows, 1))
            figures = []
            for how in ("lone", "rows", "gathered"):
                times = []
                for _ in range(args.repeat):
                    lengths = [c.length for c in caches]
                    started = time.perf_counter()
                    if how == "lone":
                        for row, cache in enumerate(caches):
                            shard(x[row : row + 1], cache)
                    elif how == "rows":
                        shard.decode_rows(x, caches)
                    else:
                        gathered_step(shard, x, caches, lengths)
                        for cache in caches:
                            cache.length += 1
                    times.append(1000 * (time.perf_counter() - started))
                    for cache, n in zip(caches, lengths, strict=True):
                        cache.length = n  # the same positions each time
                figures.append(statistics.median(times))
        print(f"{rows:>3} | {figures[0]:>12.2f} | {figures[1]:>11.2f} | {figures[2]:>9.2f}")


def linear_kernels(args: argparse.Namespace) -> None:
    """ms per product of B rows with one `intermediate x hidden` weight: torch's `F.linear`
    (MKL) and `daemon.shards.model.linear.linear` (oneDNN on CPU float32)."""
    inter = args.hidden * 11 // 4
    weight = torch.randn(inter, args.hidden) * 0.02
    print(
        f"\nlinear: one [{inter}, {args.hidden}] {weight.dtype} weight, ms per product "
        f"(median of {args.repeat * 3}), {torch.get_num_threads()} threads"
    )
    header = f"{'B':>3} | {'F.linear':>8} | {'linear':>8} | {'max diff':>8}"
    print(header)
    print("-" * len(header))
    for rows in args.sessions:
        x = torch.randn(rows, args.hidden)
        figures = []
        for fn in (F.linear, linear):
            fn(x, weight)
            times = []
            for _ in range(args.repeat * 3):
                started = time.perf_counter()
                fn(x, weight)
                times.append(1000 * (time.perf_counter() - started))
            figures.append(statistics.median(times))
        diff = (F.linear(x, weight) - linear(x, weight)).abs().max().item()
        print(f"{rows:>3} | {figures[0]:>8.2f} | {figures[1]:>8.2f} | {diff:>8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", action="store_true", help="also the kernel table")
    parser.add_argument("--kernel-only", action="store_true")
    parser.add_argument("--linear", action="store_true", help="only the linear kernels table")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--pipeline", action="store_true", help="also the pipeline tables")
    parser.add_argument("--pipeline-only", action="store_true")
    parser.add_argument("--hops", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--pass-ms", type=float, default=2.0)
    parser.add_argument("--row-ms", type=float, default=10.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.linear:
        linear_kernels(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(
            Path(tmp) / "m",
            layers=args.layers,
            hidden=args.hidden,
            heads=8,
            kv_heads=4,
            intermediate=args.hidden * 11 // 4,
            seed=1,
        )
        if args.pipeline or args.pipeline_only:
            pipelined(args, model_dir)
        if args.pipeline_only:
            return
        if not args.kernel_only:
            end_to_end(args, model_dir)
        if args.kernel or args.kernel_only:
            kernel(args, model_dir)


if __name__ == "__main__":
    main()
