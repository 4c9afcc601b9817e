"""What the shard tests with real daemon processes share: the tiny model, its reference
tokens, and deploying it over a devnet (tests/daemon/test_shard_procs*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.devnet import Devnet, wait_for
from daemon.shards.model import greedy_generate, load_model, make_tiny

LAYERS = 6
PROMPT = list(b"a network of shards")
NEW_TOKENS = 24


def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint the shard process tests deploy (a module fixture in each file)."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "m", layers=LAYERS, seed=7)


def reference_tokens(model_dir: Path, new_tokens: int = NEW_TOKENS) -> list[int]:
    """Its greedy tokens in one process, which every split run must give exactly."""
    return greedy_generate([load_model(model_dir)], PROMPT, new_tokens)


def deploy(net: Devnet, model_dir, ranges: list[tuple[int, int]]) -> None:
    plan = [
        {"peer_id": d.peer_id, "start": a, "end": b}
        for d, (a, b) in zip(net.daemons, ranges, strict=True)
    ]
    result = net.daemons[0].call(
        "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": plan}
    )
    errors = [r for r in result["results"] if not r["ok"]]
    logs = "\n".join(f"--- {d.peer_id[-8:]} ---\n{d.log_tail(40)}" for d in net.daemons)
    assert not errors, f"{errors}\n{logs}"
    wait_for(
        lambda: all(
            len(d.call("block_list", {"model": "tiny"})["announced"].get("tiny", [])) == len(ranges)
            for d in net.daemons
        ),
        15,
        "every daemon to see every announced shard",
    )
