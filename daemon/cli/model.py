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
    """Write a small deterministic random Llama checkpoint (Hugging Face layout)."""
    from daemon.shards import model

    try:
        path = model.make_tiny(
            directory,
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
        config = model.LlamaConfig.from_dir(path)
    except model.ModelError as exc:
        typer.echo(f"gridmesh: {exc}", err=True)
        raise typer.Exit(1) from None
    params = config.num_parameters()
    nbytes = params * model.DTYPE_BYTES[dtype]
    typer.echo(f"path:       {path}")
    typer.echo(f"parameters: {params:,}")
    typer.echo(f"bytes:      {nbytes:,} ({dtype})")
