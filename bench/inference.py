"""Inference benchmark: decode speed in one process and split over 2, 3 and 4 daemons.

Makes a random Llama-shaped checkpoint (default: hidden 2048, 8 layers, float32), then
- one process: greedy decode with the KV cache (the reference), tokens/s;
- N daemons on loopback, each serving a contiguous range, driven by one extra client daemon:
  decode tokens/s and the overhead per network hop,
  (time per token split - time per token in one process) / hops, both chained (each server
  pushes to the next, the default) and relayed (the client sends every hop's input);
- recovery: 3 servers with a replica of the middle range; the serving replica is SIGKILLed
  mid-generation; seconds from the failure to the first replayed step, and whether the
  tokens equal the reference.
Every daemon and the reference use `--threads` torch threads (default 1) so that processes
sharing this machine's cores are compared fairly.
Targets: overhead per hop <= 5 ms for hidden 2048 on loopback; recovery <= 5 s.

usage: python bench/inference.py [--hidden 2048] [--layers 8] [--tokens 32] [--splits 2 3 4]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # don't let bench/ shadow packages

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from daemon.config import REPO_CONFIGS  # noqa: E402
from daemon.devnet import DaemonProcess, Devnet, wait_for  # noqa: E402
from daemon.shards.model import greedy_generate, load_model, make_tiny  # noqa: E402

PROMPT = list(range(10, 26))


def config_text(threads: int) -> str:
    """The devnet config with `threads` torch threads and background chatter at the pace of
    a real node (the devnet's 2 s publishes and pings steal cores from the steps we time)."""
    base = (REPO_CONFIGS / "devnet.toml").read_text()
    for old, new in (
        ("torch_threads = 1", f"torch_threads = {threads}"),
        ("publish_interval_s = 2.0", "publish_interval_s = 30.0"),
        ("record_validity_s = 10.0", "record_validity_s = 90.0"),
        ("ping_interval_s = 2.0", "ping_interval_s = 10.0"),
        ("sync_interval_s = 1.0", "sync_interval_s = 5.0"),
    ):
        if old not in base:
            raise RuntimeError(f"configs/devnet.toml no longer has {old!r}")
        base = base.replace(old, new)
    return base


def one_process(model_dir: Path, tokens: int) -> tuple[float, list[int]]:
    model = load_model(model_dir)
    greedy_generate([model], PROMPT, 2)  # warm up
    started = time.perf_counter()
    short = greedy_generate([model], PROMPT, 1)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    out = greedy_generate([model], PROMPT, tokens + 1)
    total = time.perf_counter() - started
    assert out[0] == short[0]
    return (total - prefill) / tokens, out


def deploy(
    client: DaemonProcess,
    servers: list[DaemonProcess],
    model_dir: Path,
    layers: int,
    ranges: list[tuple[int, int]] | None = None,
) -> None:
    n = len(servers)
    ranges = ranges or [(i * layers // n, (i + 1) * layers // n) for i in range(n)]
    plan = [
        {"peer_id": d.peer_id, "start": a, "end": b}
        for d, (a, b) in zip(servers, ranges, strict=True)
    ]
    result = client.call("block_deploy", {"model": "m", "model_dir": str(model_dir), "plan": plan})
    failed = [r for r in result["results"] if not r["ok"]]
    if failed:
        raise RuntimeError(f"deploy failed: {failed}")
    wait_for(
        lambda: len(client.call("block_list", {"model": "m"})["announced"].get("m", [])) == n,
        60,
        "announcements",
    )


def timed_generate(client: DaemonProcess, tokens: int, relay: bool) -> tuple[float, list[int]]:
    params = {"model": "m", "token_ids": PROMPT, "relay": relay}
    client.call("generate", {**params, "max_tokens": 2})  # warm up: torch import, caches
    started = time.perf_counter()
    client.call("generate", {**params, "max_tokens": 1})
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    out = client.call("generate", {**params, "max_tokens": tokens + 1})
    total = time.perf_counter() - started
    if out["forwarding"] != ("relayed" if relay else "chained"):
        raise RuntimeError(f"asked relay={relay}, the generation went {out['forwarding']}")
    return (total - prefill) / tokens, out["tokens"]


def recovery(root: Path, config: Path, model_dir: Path, layers: int, reference: list[int]):
    third = layers // 3
    ranges = [(0, third), (third, 2 * third), (third, 2 * third), (2 * third, layers)]
    with Devnet(5, root=root, config=config) as net:
        net.wait_all_found(60)
        client, servers = net.daemons[0], net.daemons[1:]
        deploy(client, servers, model_dir, layers, ranges)
        client.call("generate", {"model": "m", "token_ids": PROMPT, "max_tokens": 2})
        job = client.call(
            "generate",
            {"model": "m", "token_ids": PROMPT, "max_tokens": len(reference), "stream": True},
        )["job"]
        route = wait_for(lambda: client.call("generate_poll", {"job": job})["route"], 60, "route")
        victim = next(d for d in servers if d.peer_id == route[1]["peer_id"])
        wait_for(lambda: client.call("generate_poll", {"job": job})["n_tokens"] >= 4, 60, "tokens")
        victim.kill()
        state = wait_for(
            lambda: (s := client.call("generate_poll", {"job": job}))["done"] and s, 300, "end"
        )
        seconds = [r["seconds"] for r in state["recoveries"]]
        return (seconds[0] if seconds else float("nan")), state["tokens"] == reference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--splits", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads = max(1, args.hidden // 128)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gridmesh-bench-") as tmp:
        root = Path(tmp)
        config = root / "bench.toml"
        config.write_text(config_text(args.threads))
        model_dir = make_tiny(
            root / "model",
            layers=args.layers,
            hidden=args.hidden,
            heads=heads,
            kv_heads=max(1, heads // 4),
            intermediate=int(args.hidden * 2.75),
            seed=0,
        )
        print(f"model: hidden {args.hidden}, {args.layers} layers, float32", file=sys.stderr)
        base, reference = one_process(model_dir, args.tokens)
        rows.append(("1 process", 0, base, True))
        for n in args.splits:
            print(f"split over {n} daemons ...", file=sys.stderr, flush=True)
            with Devnet(n + 1, root=root / f"split{n}", config=config) as net:
                net.wait_all_found(60)
                deploy(net.daemons[0], net.daemons[1:], model_dir, args.layers)
                for relay in (False, True):
                    per_token, tokens = timed_generate(net.daemons[0], args.tokens, relay)
                    how = "relayed" if relay else "chained"
                    rows.append((f"{n} daemons, {how}", n, per_token, tokens == reference))
        print("recovery ...", file=sys.stderr, flush=True)
        recovery_s, recovered_same = recovery(
            root / "recovery", config, model_dir, args.layers, reference
        )
    header = (
        f"{'setup':>20} | {'hops':>4} | {'ms/token':>8} | {'tokens/s':>8} | "
        f"{'overhead/hop':>12} | {'same tokens':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, hops, per_token, same in rows:
        overhead = f"{(per_token - base) * 1000 / hops:>9.2f} ms" if hops else f"{'-':>12}"
        print(
            f"{name:>20} | {hops:>4} | {per_token * 1000:>8.2f} | {1 / per_token:>8.2f} | "
            f"{overhead} | {'yes' if same else 'NO':>11}"
        )
    print(
        f"recovery from a SIGKILLed server: {recovery_s:.2f} s; "
        f"tokens equal to one process: {'yes' if recovered_same else 'NO'}"
    )
    print("targets: overhead per hop <= 5 ms (hidden 2048, loopback); recovery <= 5 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
