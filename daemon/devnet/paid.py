"""`make devnet`'s paid generation: the demo model deployed through the cluster, a job
deposited on the dev chain by a node that serves none of it, the generation through the
cluster compared with one process, settlement and refund, every balance checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.devnet import DaemonProcess, Devnet, wait_for
from daemon.devnet.cluster import CLUSTER, MODEL, MODEL_DIR, deploy_through_cluster


def generate_demo(
    client: DaemonProcess,
    daemons: list[DaemonProcess],
    model_dir: Path,
    prompt: str,
    max_tokens: int,
    job_id: str | None = None,
) -> tuple[bool, set[str]]:
    """Generate from `client` (as paid job `job_id` when given) through the deployed model
    and compare with a single-process run. Returns whether the token ids are equal, and the
    peer ids of the route's servers."""
    from daemon.shards.model import greedy_generate, load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(prompt)
    params: dict[str, Any] = {"model": MODEL, "token_ids": ids, "max_tokens": max_tokens}
    if job_id is not None:
        params["job_id"] = job_id
    remote = client.call("generate", params)
    local = greedy_generate([load_model(model_dir)], ids, max_tokens)
    names = {d.peer_id: f"node{i}" for i, d in enumerate(daemons)}
    me = names[client.peer_id]
    route = " -> ".join(f"{names[h['peer_id']]}[{h['start']},{h['end']})" for h in remote["route"])
    remote_text, local_text = tokenizer.decode(remote["tokens"]), tokenizer.decode(local)
    how = {"chained": "each server pushed to the next", "relayed": f"{me} relayed every hop"}
    print(f"route from {me}: {route} ({how[remote['forwarding']]})")
    print(f"generated {len(remote['tokens'])} tokens in {remote['seconds']} s")
    print(f"through the cluster: {remote_text!r}")
    print(f"single process:      {local_text!r}")
    same = remote["tokens"] == local
    print("identical to the single-process run" if same else "DIFFERENT from the single process")
    return same, {h["peer_id"] for h in remote["route"]}


def paid_demo(devnet: Devnet, chain: Any, parties: list[Any]) -> bool:
    """Fund every node, make a tiny model and deploy it through the cluster's coordinator,
    register and stake the members it placed it on, deposit a job for a node that serves
    none of it, generate as that job, let the providers settle, refund the rest after the
    deadline (the chain's clock moved on) and print each party's balance before and after.
    Returns whether the texts were identical and every balance is exactly right."""
    from rich.console import Console
    from rich.table import Table

    from daemon.payments import devnet_chain as dc
    from daemon.shards.model import make_tiny

    daemons = devnet.daemons
    fees = dc.Party("fees", chain.fee_recipient)
    chain.fund(parties, 1000 * dc.TUSD)
    print("funded every node (gas, 1000 tUSD)")
    model_dir = make_tiny(devnet.root / MODEL_DIR, layers=6, hidden=64, heads=4, kv_heads=2, seed=1)
    print(f"made a tiny 6-layer model in {model_dir}; deploying it through {CLUSTER!r}")
    servers = deploy_through_cluster(daemons, model_dir)
    client = next((d for d in daemons if d not in servers), daemons[0])
    requester = parties[daemons.index(client)]
    providers = [parties[daemons.index(d)] for d in servers]
    methods = dc.methods_of(client)
    for party, daemon in zip(providers, servers, strict=True):
        if "stake" in methods:  # as `gridmesh stake 100tUSD` on that node does
            daemon.call("stake", {"amount": dc.MIN_STAKE}, timeout=120)
        else:
            chain.stake(party, daemon.peer_id)
    names = ", ".join(p.name for p in providers)
    print(f"{names} (serving it) registered and staked 100 tUSD each")
    before = chain.balances([*parties, fees])
    paid_flow = "job_id" in methods.get("generate", [])
    job = dc.create_job(chain, client, requester, "job_create" in methods)
    print(
        f"{requester.name} deposited {dc.DEPOSIT / dc.TUSD:g} tUSD for job {job} (max price "
        f"{dc.PRICE_PER_UNIT}/unit, deadline in {dc.DEADLINE_S} s); servers charge "
        f"{dc.PRICE_PER_UNIT}/unit"
    )
    if not paid_flow:
        print("this build's generate takes no job_id: the demo runs free, the job is refunded")
    same, route = generate_demo(
        client, daemons, model_dir, "gridmesh ", 24, job if paid_flow else None
    )
    if paid_flow and not route & {d.peer_id for d in servers}:  # say why nothing will be paid
        print(
            "the route went through none of the staked servers: the cluster placed the model "
            "elsewhere meanwhile (a member declared dead on a busy machine?); see cluster_info"
        )
    acked: dict[str, int] = {}
    if paid_flow:
        acked = wait_for(lambda: dc.acknowledged(client, job), 30, f"{requester.name}'s vouchers")
        wait_for(
            lambda: (
                dc.settled(chain, job, providers)
                == {p.address: acked.get(p.address, 0) for p in providers}
            ),
            60,
            f"the providers to settle what {requester.name} acknowledged",
            poll_s=0.5,
        )
    paid = dc.settled(chain, job, providers)
    chain.advance(dc.DEADLINE_S + 1)
    refunded = dc.refund(chain, client, requester, job, "job_refund" in methods)
    after = chain.balances([*parties, fees])
    table = Table(title=f"tUSD balances before and after job {job[:18]}...")
    for column in ("party", "before", "after", "change"):
        table.add_column(column)
    for row in dc.balance_rows(before, after):
        table.add_row(*row)
    Console(width=200).print(table)
    for party in providers:
        print(
            f"{party.name}: acknowledged {acked.get(party.address, 0)}, settled "
            f"{paid[party.address]} (smallest units; fee {dc.FEE_BPS / 100:g} %)"
        )
    print(f"{requester.name} refunded {refunded} after the deadline")
    wrong = dc.check_balances(before, after, requester, providers, paid)
    if paid_flow and not any(paid.values()):
        wrong.append("nothing was settled for the paid generation")
    for line in wrong:
        print(f"WRONG: {line}")
    if not wrong:
        print("every balance is exactly right")
    return same and not wrong
