"""`gridmesh model ...`: make and inspect model checkpoints for block shards.

torch is imported inside the commands only, so `gridmesh --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

model_app = typer.Typer(
    help="Model checkpoints for block shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@model_app.callback()
def _group() -> None:
    """Model checkpoints for block shards."""


@model_app.command("make-tiny")
def make_tiny(
    directory: Path = typer.Argument(..., help="Where to write the checkpoint."),
    family: str = typer.Option(
        "llama",
        "--family",
        help="llama, qwen2, qwen3, mistral, qwen3_moe or mixtral (Hugging Face layout).",
    ),
    sliding_window: int | None = typer.Option(
        None,
        "--sliding-window",
        min=1,
        help="Attention window (mistral: every layer; qwen2/qwen3: the layers from "
        "--max-window-layers on, as use_sliding_window).",
    ),
    max_window_layers: int = typer.Option(
        0, "--max-window-layers", min=0, help="qwen2/qwen3: the first layer with the window."
    ),
    layer_types: str = typer.Option(
        "",
        "--layer-types",
        help="mistral/qwen2/qwen3: each layer's attention, comma-separated full_attention or "
        "sliding_attention (with --sliding-window), e.g. sliding_attention,full_attention.",
    ),
    head_dim: int | None = typer.Option(
        None, "--head-dim", min=2, help="Head size (default: hidden / heads; qwen3: 128)."
    ),
    attention_bias: bool = typer.Option(
        False, "--attention-bias", help="llama/qwen3: biases on the attention projections."
    ),
    experts: int | None = typer.Option(
        None, "--experts", min=1, help="qwen3_moe/mixtral: experts per sparse layer (4)."
    ),
    experts_per_token: int | None = typer.Option(
        None, "--experts-per-token", min=1, help="qwen3_moe/mixtral: experts per token (2)."
    ),
    expert_intermediate: int | None = typer.Option(
        None, "--expert-intermediate", min=1, help="qwen3_moe/mixtral: an expert's MLP size (64)."
    ),
    layers: int = typer.Option(4, "--layers", min=1, help="Decoder layers."),
    hidden: int = typer.Option(64, "--hidden", min=2, help="Hidden size."),
    heads: int = typer.Option(4, "--heads", min=1, help="Attention heads."),
    kv_heads: int = typer.Option(2, "--kv-heads", min=1, help="Key/value heads."),
    intermediate: int = typer.Option(128, "--intermediate", min=1, help="MLP size."),
    vocab: int = typer.Option(258, "--vocab", min=258, help="Vocabulary (256 bytes + 2)."),
    max_positions: int = typer.Option(512, "--max-positions", min=1, help="Context length."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    tie: bool = typer.Option(False, "--tie/--no-tie", help="Tie LM head to the embedding."),
    shards: int = typer.Option(1, "--shards", min=1, help="Safetensors files to split into."),
    chat: bool = typer.Option(
        True,
        "--chat-template/--no-chat-template",
        help="Write a ChatML-style chat template (tokenizer_config.json), so that "
        "/v1/chat/completions works on the checkpoint.",
    ),
) -> None:
    """Write a small deterministic random checkpoint of a family (Hugging Face layout)."""
    from daemon.shards import model

    try:
        path = model.make_tiny(
            directory,
            family=family,
            sliding_window=sliding_window,
            max_window_layers=max_window_layers,
            layer_types=tuple(kind.strip() for kind in layer_types.split(",") if kind.strip()),
            head_dim=head_dim,
            attention_bias=attention_bias,
            experts=experts,
            experts_per_token=experts_per_token,
            expert_intermediate=expert_intermediate,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            vocab=vocab,
            max_positions=max_positions,
            seed=seed,
            dtype=dtype,
            tie=tie,
            shards=shards,
            **({} if chat else {"chat_template": None}),
        )
        config = model.ModelConfig.from_dir(path)
    except model.ModelError as exc:
        typer.echo(f"gridmesh: {exc}", err=True)
        raise typer.Exit(1) from None
    params = config.num_parameters()
    nbytes = params * model.DTYPE_BYTES[dtype]
    typer.echo(f"path:       {path}")
    typer.echo(f"family:     {config.family}")
    typer.echo(f"parameters: {params:,}")
    typer.echo(f"bytes:      {nbytes:,} ({dtype})")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n:,} bytes ({n / scale:.1f} {unit})"
    return f"{n:,} bytes"


def _spans(layers: list[int]) -> str:
    """Layer indices as runs: [0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@model_app.command("inspect")
def inspect(
    directory: Path = typer.Argument(..., help="A Hugging Face checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """What a checkpoint is and whether gridmesh can serve it: family, dtype, layers,
    parameters, memory per layer and per KV-cache token (read from config.json and the
    safetensors headers; no weight is loaded). Exits 1 when it cannot be served."""
    import json

    from daemon.shards import model

    report = model.inspect_checkpoint(directory)
    problems = report["problems"]
    if as_json:
        typer.echo(json.dumps({**report, "servable": not problems}, indent=2))
        raise typer.Exit(1 if problems else 0)
    typer.echo(f"path:         {report['path']}")
    if "family" in report:
        heads = f"{report['heads']} heads, {report['kv_heads']} kv heads of {report['head_dim']}"
        extras = [
            name
            for name, on in (
                ("q/k/v biases", report["qkv_bias"]),
                ("o_proj bias", report["o_bias"]),
                ("q/k norms", report["qk_norm"]),
                ("tied embeddings", report["tied_embeddings"]),
            )
            if on
        ]
        window = report["sliding_window"]
        sliding = report["sliding_layers"]
        typer.echo(f"family:       {report['family']}")
        typer.echo(f"dtype:        {report['dtype'] or 'unknown'}")
        typer.echo(f"layers:       {report['layers']} (hidden {report['hidden_size']}, {heads})")
        typer.echo(f"vocabulary:   {report['vocab_size']:,}")
        typer.echo(f"features:     {', '.join(extras) or 'none beyond Llama'}")
        if report.get("experts"):
            moe = report["experts"]
            typer.echo(
                f"experts:      {moe['experts']} per sparse layer, {moe['per_token']} per token, "
                f"{len(moe['sparse_layers'])} sparse layers (all experts counted in the bytes)"
            )
        if window and sliding:
            full = [i for i in range(report["layers"]) if i not in set(sliding)]
            which = (
                f"{len(sliding)} layers ({_spans(sliding)}), full on {len(full)} ({_spans(full)})"
                if full
                else "all layers"
            )
            typer.echo(f"attention:    sliding window {window:,} on {which}")
        else:
            typer.echo("attention:    full")
        typer.echo(f"parameters:   {report['parameters']:,}")
        unit = report["bytes_dtype"]
        typer.echo(f"per layer:    {_size(report['bytes_per_layer'])}, in {unit}")
        typer.echo(f"embedding:    {_size(report['embedding_bytes'])}")
        typer.echo(f"head:         {_size(report['head_bytes'])}")
        typer.echo(f"total:        {_size(report['total_bytes'])}")
        per_token = report["kv_cache_bytes_per_token"]
        per_layer = report["kv_cache_bytes_per_token_per_layer"]
        typer.echo(f"KV cache:     {per_token:,} bytes per token ({per_layer:,} per layer)")
        if window and sliding:
            typer.echo(f"              sliding layers hold at most {window:,} tokens")
        at_max = report["kv_cache_bytes_at_max_positions"]
        typer.echo(f"              {_size(at_max)} at {report['max_positions']:,} tokens")
        if report["planned_bytes"] is not None:
            typer.echo(
                f"planned:      {_size(report['planned_bytes'])} on one node, with a KV-cache "
                f"reserve of {report['kv_reserve_tokens']:,} tokens per layer"
                + (" (sliding layers: their window)" if window and sliding else "")
            )
    elif report.get("model_type") is not None:
        typer.echo(f"model_type:   {report['model_type']}")
    if not problems:
        typer.echo("servable:     yes")
        return
    typer.echo("servable:     no")
    for problem in problems[:10]:
        typer.echo(f"  - {problem}")
    if len(problems) > 10:
        typer.echo(f"  ... and {len(problems) - 10} more")
    raise typer.Exit(1)
