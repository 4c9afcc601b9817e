"""The `gridmesh` commands that serve and use models: deploy, undeploy, blocks, generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from daemon.cli import common, render
from daemon.cli.common import HomeOption, JsonOption, call, fail, long_call, print_json

MaxPriceOption = typer.Option(
    None,
    "--max-price-per-unit",
    min=0,
    help="Use no provider whose price per layer-token (in the stablecoin's smallest unit) is "
    "over this, or that declares none (default: the daemon's [market] max_price_per_unit; "
    "unset there: any).",
)


def deploy(
    model_dir: Path = typer.Argument(
        ...,
        help="Local directory of a Hugging Face Llama checkpoint, at the same path on every "
        "node that loads a part (config.json, *.safetensors, tokenizer.json).",
    ),
    model: str = typer.Option(..., "--model", help="Id to serve it under, e.g. tiny."),
    nodes: int | None = typer.Option(
        None,
        "--nodes",
        min=1,
        help="Split each copy over exactly this many nodes (default: as few as fit).",
    ),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Copies of the chain."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print the plan (shard_plan)."),
    max_price_per_unit: int | None = MaxPriceOption,
    cluster: str | None = typer.Option(
        None,
        "--cluster",
        help="Deploy through this cluster's coordinator instead: it places the copies on the "
        "members, places a dead member's layers again and scales between the block's min and "
        "max instances (`gridmesh cluster plan` is its dry run; --nodes, --dry-run and "
        "--max-price-per-unit do not apply).",
    ),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Split a model into block shards and have the chosen daemons load them.

    Only nodes that accept deploys from peers ([shards] allow_remote_deploy = true), and
    this node, are planned on. If any node fails to load its part, the nodes that loaded
    theirs unload again: a model is deployed completely or not at all.
    With --cluster, the cluster's coordinator places and keeps the model instead.
    Undo with `gridmesh undeploy MODEL`."""
    if dtype not in ("float32", "float16", "bfloat16"):
        fail(f"--dtype {dtype!r}: use float32, float16 or bfloat16")
    if not model_dir.is_dir():
        fail(f"{model_dir} is not a directory (expected a Hugging Face checkpoint)")
    if not (model_dir / "config.json").is_file():
        fail(f"{model_dir} has no config.json: is it a Hugging Face checkpoint directory?")
    if cluster is not None:
        if nodes is not None or dry_run or max_price_per_unit is not None:
            fail(
                "--cluster: the coordinator places the model; --nodes, --dry-run and "
                "--max-price-per-unit do not apply (see `gridmesh cluster plan`)"
            )
        _deploy_through(home, cluster, model, model_dir, dtype, replicas, as_json)
        return
    params: dict[str, Any] = {"model_dir": str(model_dir.resolve()), "dtype": dtype}
    if nodes is not None:
        params["nodes"] = nodes
    params["replicas"] = replicas
    if max_price_per_unit is not None:
        params["max_price_per_unit"] = max_price_per_unit
    plan = long_call(home, "shard_plan", params, "planning")
    if dry_run:
        if as_json:
            print_json(plan)
            return
        for item in plan["assignments"]:
            typer.echo(f"{item['peer_id']}  layers [{item['start']}, {item['end']})")
        return
    assignments = [
        {"peer_id": a["peer_id"], "start": a["start"], "end": a["end"]} for a in plan["assignments"]
    ]
    count = len({a["peer_id"] for a in assignments})
    result = long_call(
        home,
        "block_deploy",
        {"model": model, "model_dir": params["model_dir"], "dtype": dtype, "plan": assignments},
        f"loading {model} on {count} node(s)",
    )
    if as_json:
        print_json(result)
    else:
        for item in result["results"]:
            state = "loaded" if item["ok"] else f"FAILED: {item['error']}"
            block = item.get("block") or {}
            span = f"[{block.get('start')}, {block.get('end')})" if block else ""
            typer.echo(f"{item['peer_id']}  {span}  {state}")
    if not all(item["ok"] for item in result["results"]):
        rolled = result.get("rolled_back") or []
        undone = [r["peer_id"] for r in rolled if r.get("ok")]
        stuck = [f"{r['peer_id']} ({r.get('error')})" for r in rolled if not r.get("ok")]
        message = f"deploy of {model} failed; unloaded it again on {len(undone)} node(s)"
        if stuck:
            message += f", but could not on: {', '.join(stuck)}"
        fail(message)


def _deploy_through(
    home: Path | None,
    cluster: str,
    model: str,
    model_dir: Path,
    dtype: str,
    replicas: int,
    as_json: bool,
) -> None:
    params = {
        "cluster": cluster,
        "model": model,
        "model_dir": str(model_dir.resolve()),
        "dtype": dtype,
        "replicas": replicas,
    }
    result = long_call(home, "block_deploy", params, f"deploying {model} through {cluster}")
    if as_json:
        print_json(result)
    else:
        typer.echo(f"coordinator {result.get('coordinator')} (term {result.get('term')})")
        for s in result.get("servers") or []:
            typer.echo(f"{s['peer_id']}  [{s['start']}, {s['end']})  {s['state']}")
    if not result.get("ok"):
        fail(
            f"{model} is not fully served through {cluster} yet: see `gridmesh cluster info "
            f"{cluster}`"
        )


def undeploy(
    model: str = typer.Argument(..., help="Model id as deployed, e.g. tiny."),
    local: bool = typer.Option(
        False, "--local", help="Only this daemon (default: every node that announces it)."
    ),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Stop serving a model: on every node that announces a part of it (as deploy loaded
    it), or with --local only on this daemon."""
    result = long_call(
        home, "block_undeploy", {"model": model, "network": not local}, f"unloading {model}"
    )
    if as_json:
        print_json(result)
        return
    if "results" in result:
        rows = result["results"]
    else:
        rows = [{"peer_id": "this node", "ok": True, "unloaded": result["unloaded"]}]
    if not rows:
        fail(f"no node announces model {model!r} (`gridmesh blocks` lists what is served)")
    for row in rows:
        state = (
            f"FAILED: {row.get('error')}"
            if not row["ok"]
            else ("unloaded" if row.get("unloaded") else "was not serving it")
        )
        typer.echo(f"{row['peer_id']}  {state}")
    if not all(row["ok"] for row in rows):
        fail(f"{model} is still served by some nodes (see above)")
    if not any(row.get("unloaded") for row in rows):
        fail(f"no node was serving model {model!r}")


def blocks(
    model: str | None = typer.Option(None, "--model", help="Only this model."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Shards served by this daemon, and every announced server per model."""
    result = call(home, "block_list", {"model": model} if model else {})
    if as_json:
        print_json(result)
    else:
        render.blocks(result)


def cancel_generation(home: Path | None, job: str) -> None:
    """Best effort `generate_cancel`: the daemon may be gone, or the job already over."""
    import contextlib

    from daemon.api.client import RPCClientError

    client = common.rpc_client(home)
    client.timeout = 5
    with contextlib.suppress(RPCClientError):
        client.call("generate_cancel", {"job": job})


def generate(
    prompt: str = typer.Argument(..., help="Text to continue."),
    model: str = typer.Option(..., "--model", help="Model id as deployed."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed."),
    relay: bool = typer.Option(
        False,
        "--relay",
        help="Route every hop's activations through this daemon (by default each server "
        "pushes to the next one directly; relaying is for servers that cannot reach each "
        "other, and is what the client falls back to when it sees that).",
    ),
    max_price_per_unit: int | None = MaxPriceOption,
    job_id: str | None = typer.Option(
        None,
        "--job",
        help="Run as this paid job (its id from `gridmesh job create`): every server signs a "
        "receipt per step, this daemon checks each and pays with vouchers against the deposit.",
    ),
    home: Path | None = HomeOption,
) -> None:
    """Generate text through the shard servers, printing tokens as they come.

    With --job the generation is paid from that job's deposit; without it, it is free work."""
    import time

    params: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "relay": relay,
    }
    if seed is not None:
        params["seed"] = seed
    if max_price_per_unit is not None:
        params["max_price_per_unit"] = max_price_per_unit
    if job_id is not None:
        params["job_id"] = job_id
    job = call(home, "generate", params)["job"]
    shown = ""
    try:
        while True:
            state = call(home, "generate_poll", {"job": job})
            if state["text"] != shown:
                typer.echo(state["text"][len(shown) :], nl=False)
                shown = state["text"]
            if state["done"]:
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        # Ctrl-C: stop the generation too, or it would run on in the daemon for nobody
        typer.echo("")
        cancel_generation(home, job)
        typer.echo("cancelled", err=True)
        raise typer.Exit(130) from None
    typer.echo("")
    if state["error"]:
        fail(state["error"])
    hops = " -> ".join(f"{h['peer_id'][-6:]}[{h['start']},{h['end']})" for h in state["route"])
    how = state.get("forwarding", "chained")
    typer.echo(f"({state['n_tokens']} tokens in {state['seconds']} s via {hops}, {how})", err=True)
    if payment := state.get("payment"):
        refused = len(payment.get("receipts_refused") or [])
        typer.echo(
            f"(paid job {payment.get('job_id')}: {payment.get('acknowledged')} acknowledged in "
            f"this generation, in the token's smallest unit; {refused} receipts refused)",
            err=True,
        )


COMMANDS = (deploy, undeploy, blocks, generate)  # registered by daemon.cli.main, in this order
