"""Inference benchmark: decode speed in one process and split over 2, 3 and 4 daemons.

Makes a random checkpoint of `--family` (llama by default; qwen2, qwen3, mistral, qwen3_moe,
... as `make_tiny(family=...)` writes them) shaped by `--preset` (`cpu` is hidden 2048, 8
layers, float32; `1b` and `8b` are Llama-3.2-1B and Llama-3.1-8B shapes in bfloat16; a
mixture of experts gets `--experts` experts of `--expert-intermediate`, `--experts-per-token`
of them per token, in place of the MLP), then
- transformers (with `--hf`, the default on CUDA): `AutoModelForCausalLM` on the same
  checkpoint, a plain greedy decode loop with its KV cache, tokens/s: the baseline a user
  would pick;
- one process: gridmesh's greedy decode with the KV cache (the reference), tokens/s;
- N daemons (servers) on loopback, each serving a contiguous range, driven by one extra client
  daemon: decode tokens/s and the overhead per token over one process, both chained (each
  server pushes to the next, the default: N + 1 messages on a step's critical path) and
  relayed (the client sends every server its input and gets its output back: 2N messages),
  over each `--transports`: `local` (Unix sockets between daemons on one host, the default
  there) and `libp2p` (Noise-encrypted yamux over TCP, what daemons on different hosts use).
  The overhead is split into a cost per message (transport, framing) and a cost per server
  (its session handling) by least squares over the rows of a transport:
  overhead = servers * per_server + messages * per_message;
- recovery: 3 servers with a replica of the middle range; the serving replica is SIGKILLed
  mid-generation; seconds from the kill to the next token (the client's own measure, from
  when it noticed the failure to the first replayed step, is shown too), and whether the
  tokens equal the reference.
On the CPU every daemon and the reference use `--threads` torch threads (default 1) so that
processes sharing this machine's cores are compared fairly; with `--device cuda` the daemons
share the GPU.
Targets: overhead per server <= 5 ms for hidden 2048 on loopback; recovery <= 5 s. On an H100:
gridmesh in one process >= 4x transformers for 8B; 4 daemons >= 0.8 of one process for 8B.

usage: python bench/inference.py [--family NAME] [--preset cpu|1b|8b] [--device cpu|cuda]
       [--splits 2 3 4] [--hidden 2048] [--layers 8] [--prompt-tokens N] [--tokens N] [--hf]
       [--no-recovery] [--sliding-window N] [--experts 16] [--experts-per-token 4]
       [--expert-intermediate N]
smallest (a check that it runs, ~1 min on 2 cores): python bench/inference.py --hidden 64
       --layers 3 --splits 2 --transports local --prompt-tokens 4 --tokens 4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # don't let bench/ shadow packages

import argparse  # noqa: E402
import inspect  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from daemon.config import REPO_CONFIGS  # noqa: E402
from daemon.devnet import DaemonProcess, Devnet, wait_for  # noqa: E402
from daemon.shards.model import greedy_generate, load_model, make_tiny  # noqa: E402
from daemon.shards.model.moe import LAYOUTS as MOE_FAMILIES  # noqa: E402

# checkpoint shapes; `cpu` follows --hidden/--layers
PRESETS: dict[str, dict] = {
    "cpu": {"dtype": "float32", "vocab": 258},
    "1b": {  # Llama-3.2-1B
        "dtype": "bfloat16",
        "hidden": 2048,
        "layers": 16,
        "heads": 32,
        "kv_heads": 8,
        "intermediate": 8192,
        "vocab": 128256,
        "tie": True,
    },
    "8b": {  # Llama-3.1-8B
        "dtype": "bfloat16",
        "hidden": 4096,
        "layers": 32,
        "heads": 32,
        "kv_heads": 8,
        "intermediate": 14336,
        "vocab": 128256,
    },
}


def config_text(threads: int, device: str, local_sockets: bool) -> str:
    """The devnet config with `threads` torch threads, shards on `device`, and background
    chatter at the pace of a real node (the devnet's 2 s publishes and pings steal cores from
    the steps we time)."""
    base = (REPO_CONFIGS / "devnet.toml").read_text()
    for old, new in (
        (
            "torch_threads = 1",
            f'torch_threads = {threads}\ndevice = "{device}"\n'
            f"local_sockets = {str(local_sockets).lower()}",
        ),
        ("publish_interval_s = 2.0", "publish_interval_s = 30.0"),
        ("record_validity_s = 10.0", "record_validity_s = 90.0"),
        ("ping_interval_s = 2.0", "ping_interval_s = 10.0"),
        ("sync_interval_s = 1.0", "sync_interval_s = 5.0"),
    ):
        if old not in base:
            raise RuntimeError(f"configs/devnet.toml no longer has {old!r}")
        base = base.replace(old, new)
    return base


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


REPEATS = 3  # every time per token is the median of this many runs: 2 cores are noisy


def median_per_token(run: Callable[[int], tuple[float, list[int]]], tokens: int):
    """Steady decode time per token, (time for tokens + 2 - time for 2) / tokens, the median
    of REPEATS runs, and the tokens of the last run. Generating 2 tokens is the prefill and
    the first decode step, where a GPU captures its CUDA graphs: both are left out."""
    samples = []
    for _ in range(REPEATS):
        prefill, short = run(2)
        total, out = run(tokens + 2)
        if out[:2] != short:
            raise RuntimeError("the first tokens changed between runs")
        samples.append((total - prefill) / tokens)
    return statistics.median(samples), out


def one_process(
    model_dir: Path, prompt: list[int], tokens: int, device: str, dtype: str, static: bool
) -> tuple[float, list[int]]:
    """gridmesh's decode loop in this process; `static`: fixed-shape steps in CUDA graphs."""
    model = load_model(model_dir, device=device, dtype=dtype)
    greedy_generate([model], prompt, 2, static=static)  # warm up

    def timed(n: int) -> tuple[float, list[int]]:
        synchronize(device)
        started = time.perf_counter()
        out = greedy_generate([model], prompt, n, static=static)
        synchronize(device)
        return time.perf_counter() - started, out

    return median_per_token(timed, tokens)


def transformers_baseline(
    model_dir: Path, prompt: list[int], tokens: int, device: str, dtype: str
) -> tuple[float, list[int]]:
    """transformers' model of the checkpoint's family, greedy, with its KV cache: a plain
    decode loop."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    ids = torch.tensor([prompt], device=device)

    def decode(n: int) -> tuple[float, list[int]]:
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            token = out.logits[0, -1].argmax()
            generated = [int(token)]
            synchronize(device)
            started = time.perf_counter()
            for _ in range(n):
                out = model(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[0, -1].argmax()
                generated.append(int(token))
            synchronize(device)
            return (time.perf_counter() - started) / n, generated

    decode(2)  # warm up
    return decode(tokens + 1)  # as many tokens as the gridmesh rows generate


def deploy(
    client: DaemonProcess,
    servers: list[DaemonProcess],
    model_dir: Path,
    layers: int,
    dtype: str,
    ranges: list[tuple[int, int]] | None = None,
) -> None:
    n = len(servers)
    ranges = ranges or [(i * layers // n, (i + 1) * layers // n) for i in range(n)]
    plan = [
        {"peer_id": d.peer_id, "start": a, "end": b}
        for d, (a, b) in zip(servers, ranges, strict=True)
    ]
    request = {"model": "m", "model_dir": str(model_dir), "plan": plan, "dtype": dtype}
    result = client.call("block_deploy", request, timeout=600)
    failed = [r for r in result["results"] if not r["ok"]]
    if failed:
        raise RuntimeError(f"deploy failed: {failed}")
    wait_for(
        lambda: len(client.call("block_list", {"model": "m"})["announced"].get("m", [])) == n,
        60,
        "announcements",
    )


def timed_generate(
    client: DaemonProcess, prompt: list[int], tokens: int, relay: bool
) -> tuple[float, list[int]]:
    params = {"model": "m", "token_ids": prompt, "relay": relay}
    client.call("generate", {**params, "max_tokens": 2}, timeout=600)  # warm up

    def timed(n: int) -> tuple[float, list[int]]:
        started = time.perf_counter()
        out = client.call("generate", {**params, "max_tokens": n}, timeout=600)
        if out["forwarding"] != ("relayed" if relay else "chained"):
            raise RuntimeError(f"asked relay={relay}, the generation went {out['forwarding']}")
        return time.perf_counter() - started, out["tokens"]

    return median_per_token(timed, tokens)


def recovery(
    root: Path,
    config: Path,
    model_dir: Path,
    layers: int,
    dtype: str,
    prompt: list[int],
    reference: list[int],
) -> tuple[float, float, bool]:
    """(seconds from the SIGKILL to the next token, seconds the client reports from noticing
    the failure to the replayed step, whether the tokens equal the reference)."""
    third = layers // 3
    ranges = [(0, third), (third, 2 * third), (third, 2 * third), (2 * third, layers)]
    with Devnet(5, root=root, config=config) as net:
        net.wait_all_found(60)
        client, servers = net.daemons[0], net.daemons[1:]
        deploy(client, servers, model_dir, layers, dtype, ranges)
        client.call("generate", {"model": "m", "token_ids": prompt, "max_tokens": 2}, timeout=600)
        job = client.call(
            "generate",
            {"model": "m", "token_ids": prompt, "max_tokens": len(reference), "stream": True},
        )["job"]
        # One loop, one poll at a time: a finished job is forgotten once its end was read.
        deadline = time.monotonic() + 300
        victim = None
        killed_at = at_kill = from_kill = None
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("the recovery generation did not finish in 300 s")
            state = client.call("generate_poll", {"job": job})
            now = time.monotonic()
            if state["done"]:
                break
            if victim is None and state["route"] and state["n_tokens"] >= 4:
                victim = next(d for d in servers if d.peer_id == state["route"][1]["peer_id"])
                victim.kill()
                killed_at, at_kill = time.monotonic(), state["n_tokens"]
            elif killed_at is not None and from_kill is None and state["n_tokens"] > at_kill + 1:
                # the token after the next one surely needed the killed server's layers (the
                # next may have passed it already): this over-counts by at most one step
                from_kill = now - killed_at
            time.sleep(0.005)
        if state["error"] or killed_at is None:
            raise RuntimeError(
                f"recovery run: {state['error'] or 'ended before a server could be killed'}"
            )
        if from_kill is None:  # it ended within a step of the kill
            from_kill = now - killed_at
        seconds = [r["seconds"] for r in state["recoveries"]]
        noticed = seconds[0] if seconds else float("nan")
        return from_kill, noticed, state["tokens"] == reference


def split_overhead(samples: list[tuple[int, int, float]]) -> tuple[float, float] | None:
    """Least squares for overhead = servers * per_server + messages * per_message over
    (servers, messages, overhead) samples: (per_server, per_message), or None when the
    samples do not tell the two apart (e.g. only chained rows)."""
    sxx = sum(s * s for s, _, _ in samples)
    syy = sum(m * m for _, m, _ in samples)
    sxy = sum(s * m for s, m, _ in samples)
    sxo = sum(s * o for s, _, o in samples)
    syo = sum(m * o for _, m, o in samples)
    det = sxx * syy - sxy * sxy
    if abs(det) < 1e-9:
        return None
    return (sxo * syy - syo * sxy) / det, (syo * sxx - sxo * sxy) / det


def make_checkpoint(root: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    shape = dict(PRESETS[args.preset])
    if args.preset == "cpu":
        heads = max(1, args.hidden // 128)
        shape.update(
            hidden=args.hidden,
            layers=args.layers,
            heads=heads,
            kv_heads=max(1, heads // 4),
            intermediate=int(args.hidden * 2.75),
        )
    if args.dtype:
        shape["dtype"] = args.dtype
    positions = max(512, args.prompt_tokens + args.tokens + 8)
    family: dict = {}
    if args.family != "llama":  # today's Llama writer has no `family` argument
        family["family"] = args.family
    if args.sliding_window:
        family["sliding_window"] = args.sliding_window
    if args.family in MOE_FAMILIES:
        family.update(
            experts=args.experts,
            experts_per_token=args.experts_per_token,
            expert_intermediate=args.expert_intermediate or shape["hidden"] * 3 // 8,
        )
    missing = [key for key in family if key not in inspect.signature(make_tiny).parameters]
    if missing:
        raise SystemExit(f"make_tiny cannot write family {args.family!r}: no {missing} argument")
    model_dir = make_tiny(root / "model", **shape, **family, max_positions=positions, seed=0)
    return model_dir, {**shape, **family}


def describe(shape: dict) -> str:
    """The family and size of the checkpoint, for the report."""
    text = f"{shape.get('family', 'llama')}, hidden {shape['hidden']}, {shape['layers']} layers"
    if shape.get("sliding_window"):
        text += f", sliding window {shape['sliding_window']}"
    if "experts" in shape:
        text += (
            f", {shape['experts']} experts of {shape['expert_intermediate']} "
            f"({shape['experts_per_token']} per token)"
        )
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", help="a family make_tiny writes")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--hidden", type=int, default=2048, help="preset cpu only")
    parser.add_argument("--layers", type=int, default=8, help="preset cpu only")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="16 on CPU, else 128")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens: 32 CPU, 128 GPU")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--splits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument(
        "--transports", nargs="+", choices=["local", "libp2p"], default=["local", "libp2p"]
    )
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--recovery", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--sliding-window", type=int, default=None, help="attention window (Mistral, Qwen)"
    )
    parser.add_argument("--experts", type=int, default=16, help="mixture of experts only")
    parser.add_argument("--experts-per-token", type=int, default=4, help="mixture of experts")
    parser.add_argument(
        "--expert-intermediate", type=int, default=None, help="experts' size: 3/8 of hidden"
    )
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.prompt_tokens = args.prompt_tokens or (128 if on_gpu else 16)
    args.tokens = args.tokens or (128 if on_gpu else 32)
    args.hf = on_gpu if args.hf is None else args.hf
    torch.set_num_threads(args.threads)
    prompt = [10 + i % 240 for i in range(args.prompt_tokens)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gridmesh-bench-") as tmp:
        root = Path(tmp)
        configs = {}
        for transport in ("local", "libp2p"):
            configs[transport] = root / f"{transport}.toml"
            text = config_text(args.threads, args.device, transport == "local")
            configs[transport].write_text(text)
        print(
            f"writing a random {args.family} {args.preset} checkpoint ...",
            file=sys.stderr,
            flush=True,
        )
        model_dir, shape = make_checkpoint(root, args)
        dtype, layers = shape["dtype"], shape["layers"]
        print(
            f"model: {describe(shape)}, {dtype}, on {args.device}; "
            f"prompt {args.prompt_tokens} tokens, {args.tokens} new",
            file=sys.stderr,
        )
        base, reference = one_process(
            model_dir, prompt, args.tokens, args.device, dtype, static=on_gpu
        )
        if args.hf:
            print("transformers ...", file=sys.stderr, flush=True)
            hf, hf_tokens = transformers_baseline(
                model_dir, prompt, args.tokens, args.device, dtype
            )
            same = hf_tokens[: len(reference)] == reference
            rows.append(("transformers", None, None, hf, same))
        if on_gpu:  # the eager loop too, to show what the graphs buy
            eager, eager_tokens = one_process(
                model_dir, prompt, args.tokens, args.device, dtype, static=False
            )
            same = eager_tokens == reference
            rows.append(("gridmesh, 1 process, eager", None, None, eager, same))
        rows.append(("gridmesh, 1 process", 0, 0, base, True))
        for n in args.splits:
            for transport in args.transports:
                print(f"split over {n} daemons, {transport} ...", file=sys.stderr, flush=True)
                with Devnet(n + 1, root=root / f"{transport}{n}", config=configs[transport]) as net:
                    net.wait_all_found(60)
                    deploy(net.daemons[0], net.daemons[1:], model_dir, layers, dtype)
                    for relay in (False, True):
                        per_token, tokens = timed_generate(
                            net.daemons[0], prompt, args.tokens, relay
                        )
                        how = "relayed" if relay else "chained"
                        name = f"{n} daemons, {transport}, {how}"
                        messages = 2 * n if relay else n + 1
                        rows.append((name, n, messages, per_token, tokens == reference))
        if args.recovery:
            print("recovery ...", file=sys.stderr, flush=True)
            # long enough to kill a server mid-generation even on a tiny model
            long_reference = greedy_generate(
                [load_model(model_dir, device=args.device, dtype=dtype)],
                prompt,
                max(args.tokens + 2, 64),
            )
            recovery_s, noticed_s, recovered_same = recovery(
                root / "recovery",
                configs[args.transports[0]],
                model_dir,
                layers,
                dtype,
                prompt,
                long_reference,
            )
    print(f"{describe(shape)}, {dtype}, on {args.device}")
    header = (
        f"{'setup':>28} | {'servers':>7} | {'messages':>8} | {'ms/token':>8} | "
        f"{'tokens/s':>8} | {'overhead':>9} | {'vs 1 process':>12} | {'same tokens':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, servers, messages, per_token, same in rows:
        overhead = f"{(per_token - base) * 1000:>6.2f} ms" if servers else f"{'-':>9}"
        print(
            f"{name:>28} | {'-' if servers is None else servers:>7} | "
            f"{'-' if messages is None else messages:>8} | {per_token * 1000:>8.2f} | "
            f"{1 / per_token:>8.2f} | {overhead} | {base / per_token:>11.2f}x | "
            f"{'yes' if same else 'NO':>11}"
        )
    print("messages: on a step's critical path (chained N + 1, relayed 2N); overhead: per token")
    for transport in args.transports:
        fit = split_overhead(
            [(s, m, t - base) for name, s, m, t, _ in rows if s and f", {transport}," in name]
        )
        if fit is None:
            print(f"{transport}: too few rows to split the overhead (needs chained and relayed)")
        else:
            per_server, per_message = fit
            print(
                f"{transport}: overhead per server {per_server * 1000:.2f} ms, "
                f"per message {per_message * 1000:.2f} ms (least squares over its rows)"
            )
    if args.hf:
        print(f"gridmesh in one process decodes {hf / base:.2f}x as fast as transformers")
    if args.recovery:
        print(
            f"recovery from a SIGKILLed server: {recovery_s:.2f} s from the kill to the next "
            f"token ({noticed_s:.2f} s from when the client noticed to the replayed step); "
            f"tokens equal to one process: {'yes' if recovered_same else 'NO'}"
        )
    print("targets: overhead per server <= 5 ms (hidden 2048, loopback); recovery <= 5 s")
    if on_gpu:
        print("GPU targets (8b): 1 process >= 4x transformers; 4 daemons >= 0.8x 1 process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
