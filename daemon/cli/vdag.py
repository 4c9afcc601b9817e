"""`gridmesh vdag ...`: vDAG specs checked against the running daemon's registries, and
their compiled plans (JSON-RPC `vdag_check`, `vdag_apply`, `vdag_plan`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from daemon.cli.common import HomeOption, JsonOption, call, fail, print_json

vdag_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

HELP = (
    "vDAGs: graphs over served blocks (AIOS format: vdagName, vdagVersion, nodes, graph). "
    "`gridmesh vdag check FILE` judges specs against this node's registries without writing "
    "them; `gridmesh vdag apply FILE` writes them once they pass, keyed name:version so "
    "older versions stay resolvable; `gridmesh vdag plan NAME` prints the compiled graph, "
    "nested vDAGs expanded, with the servers of each node's block. A refusal names the node "
    "or the edge, e.g. \"nodes[2] 'classify': unknown block 'clf'\"."
)


@vdag_app.callback(help=HELP)
def _group() -> None:
    pass


@vdag_app.command()
def plan(
    name: str = typer.Argument(..., help="The vDAG's name (or name:version)."),
    version: str | None = typer.Option(None, "--version", help="A version (default: latest)."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Dry run: the compiled graph of a stored vDAG, nested vDAGs expanded, each step with the
    block serving it and the servers announcing that block now."""
    params: dict[str, Any] = {"name": name}
    if version is not None:
        params["version"] = version
    result = call(home, "vdag_plan", params)
    if as_json:
        print_json(result)
    else:
        show_plan(result)


def _specs(files: list[str]) -> list[dict[str, Any]]:
    from daemon.specs import SpecError, load_documents

    docs: list[dict[str, Any]] = []
    for source in files:
        try:
            loaded = load_documents(source)
        except SpecError as exc:
            fail(str(exc))
        for doc in loaded:
            if doc["kind"] != "vdags":
                fail(f"{source}: {doc['kind']}/{doc['key']} is not a vDAG (use `gridmesh apply`)")
            docs.append(doc)
    return docs


@vdag_app.command()
def check(
    files: list[str] = typer.Argument(..., help="YAML or JSON files of vdags documents."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Judge vDAG documents ({kind: vdags, value}) as `vdag apply` would, writing nothing."""
    plans = [call(home, "vdag_check", {"value": doc["value"]}) for doc in _specs(files)]
    if as_json:
        print_json(plans)
        return
    for result in plans:
        show_plan(result)


@vdag_app.command()
def apply(
    files: list[str] = typer.Argument(..., help="YAML or JSON files of vdags documents."),
    home: Path | None = HomeOption,
) -> None:
    """Write vDAG documents once they pass the checks that need the registries (blocks,
    sub-vDAGs); a document without `key` (or keyed by its vdagName) is keyed name:version."""
    from daemon.cli import render

    for doc in _specs(files):
        params: dict[str, Any] = {"value": doc["value"]}
        if doc["key"] != doc["value"].get("vdagName"):  # else keyed name:version
            params["key"] = doc["key"]
        entry = call(home, "vdag_apply", params)
        typer.echo(f"vdags/{entry['key']} applied (version {render.version(entry['version'])})")


@vdag_app.command()
def infer(
    name: str = typer.Argument(..., help="The vDAG's name (or name:version)."),
    input_json: str = typer.Option(
        ...,
        "--input",
        help='The input as JSON (e.g. \'{"text": "hello"}\'), or @FILE to read it from a file.',
    ),
    version: str | None = typer.Option(None, "--version", help="A version (default: latest)."),
    deadline_s: float | None = typer.Option(
        None, "--deadline", min=0.001, help="Seconds for the whole graph (default: the daemon's)."
    ),
    session: str | None = typer.Option(None, "--session", help="Session id for quota policies."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Run a stored vDAG on an input across the daemons serving its blocks, and print its
    output (--json: also each step's instance, attempts and times)."""
    text = input_json
    if input_json.startswith("@"):
        try:
            text = Path(input_json[1:]).read_text()
        except OSError as exc:
            fail(f"cannot read the input file {input_json[1:]}: {exc.strerror or exc}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--input is not JSON: {exc}")
    params: dict[str, Any] = {"name": name, "input": value}
    for key, given in (("version", version), ("deadline_s", deadline_s), ("session", session)):
        if given is not None:
            params[key] = given
    result = call(home, "vdag_infer", params)
    print_json(result if as_json else result.get("output"))


def _policies(step: dict[str, Any]) -> str:
    names = {"assignment": "assign", "preprocessing": "pre", "postprocessing": "post"}
    out = [f"{short}={step[key]['uri']}" for key, short in names.items() if step.get(key)]
    return " ".join(out) or "-"


def _servers(step: dict[str, Any]) -> str:
    from daemon.cli.render import short_id

    servers = step.get("servers") or []
    if not servers:
        return "assignment policy" if step.get("block_id") is None else "none now"
    return ", ".join(
        f"{short_id(s['peer_id'])} [{s['layers'][0]}-{s['layers'][1]})" for s in servers
    )


def show_plan(result: dict[str, Any]) -> None:
    from rich.table import Table

    from daemon.cli.render import console

    nested = result.get("nested") or []
    title = f"vDAG {result['vdag']}: {len(result['steps'])} steps"
    if nested:
        title += f", nests {', '.join(nested)}"
    table = Table(title=title)
    for column in ("level", "step", "block", "after", "policies", "served by"):
        table.add_column(column, overflow="fold")
    inputs = {p["step"] for p in result["inputs"]}
    outputs = {p["step"] for p in result["outputs"]}
    for step in result["steps"]:
        after = list(step["after"]) + (["(input)"] if step["label"] in inputs else [])
        label = step["label"] + (" -> (output)" if step["label"] in outputs else "")
        table.add_row(
            str(step["level"]),
            label,
            step["block_id"] or "-",
            ", ".join(after),
            _policies(step),
            _servers(step),
        )
    console.print(table)
