"""Real daemon processes on libp2p (127.0.0.1): five daemons in one cluster (three voters, two
workers) and a sixth member in the test's process, a worker peer that records what the
coordinator sends it. The coordinator is SIGSTOPped past its lease and the rest elect another;
then what the old one signed in its term (a command it really sent, replayed, and the next one
it would have sent, signed with its key) is refused as stale by every member, counted in
their /metrics; SIGCONTed, it steps down, all five agree on one coordinator again, and it
refuses its own old command too."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest
import trio

from daemon.cluster import coordinator_wire
from daemon.devnet import DaemonProcess, Devnet
from p2p import codec, identity
from scheduler.fencing import sign_command
from tests.daemon.cluster_procs import (
    agreed,
    form_cluster,
    stale_refusals,
    views,
    worker_peer,
)

pytestmark = pytest.mark.procs

C = "fence"


async def until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """`condition` (run in a thread: it makes blocking RPC calls) until it is truthy."""
    deadline = trio.current_time() + timeout_s
    while True:
        result = await trio.to_thread.run_sync(condition)
        if result:
            return result
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await trio.sleep(0.1)


def _logs(daemons: list[DaemonProcess]) -> str:
    return "\n".join(f"--- {d.peer_id[-8:]} ---\n{d.log_tail(25)}" for d in daemons)


async def test_a_resumed_coordinators_commands_are_refused_as_stale_and_it_steps_down(
    tmp_path, fast_config
):
    with Devnet(5, root=tmp_path, config=fast_config) as devnet:
        daemons = devnet.daemons
        await trio.to_thread.run_sync(devnet.wait_all_found, 120)
        await trio.to_thread.run_sync(form_cluster, daemons, C, 3)
        network_id = daemons[0].call("node_info")["network_id"]
        async with worker_peer(network_id, daemons) as worker:
            await worker.join(daemons, C)

            def announced() -> Any:
                """The coordinator all agree on, once it told the new worker of itself."""
                now = agreed(daemons, C)
                got = [r for r in worker.received if (r.command.signer, r.command.term) == now]
                return (now, got[-1].command) if got else None

            (leader_id, term), sent = await until(announced, 60, "the coordinator's command")
            leader = next(d for d in daemons if d.peer_id == leader_id)
            rest = [d for d in daemons if d is not leader]
            # what it would send next in its term, signed with its own key: a deployment
            # table that, if taken, would empty every member's
            key = identity.load_identity(leader.home)
            assert key.peer_id == leader_id
            empty = coordinator_wire.to_body(coordinator_wire.TableBody(term, 10**6, []))
            next_one = sign_command(
                key, C, term, sent.seq + 1, coordinator_wire.DEPLOYMENTS, codec.encode(empty)
            )
            leader.proc.send_signal(signal.SIGSTOP)
            try:
                new_id, new_term = await until(
                    lambda: agreed(rest, C), 30, "a new coordinator among the other four"
                )
                assert new_id != leader_id and new_term > term
                before = {d.peer_id: stale_refusals(d) for d in rest}
                for d in rest:
                    assert await worker.send(d, sent) == "stale_term", d.peer_id
                    assert await worker.send(d, next_one) == "stale_term", d.peer_id
                for d in rest:
                    assert stale_refusals(d) >= before[d.peer_id] + 2, d.peer_id
            finally:
                leader.proc.send_signal(signal.SIGCONT)
            resumed = trio.current_time()

            def settled() -> Any:
                """One coordinator known to all five again, at the new term or a later one
                (a loaded machine may hold more elections)."""
                now = agreed(daemons, C)
                return now if now is not None and now[1] >= new_term else None

            try:
                final_id, final_term = await until(settled, 30, "the woken one to follow")
            except AssertionError:
                raise AssertionError(f"{views(daemons, C)}\n{_logs(daemons)}") from None
            # on waking it found its lease gone and stepped down: it coordinates only if it
            # won a later term since
            view = leader.call("cluster_coordinator", {"name": C})
            assert view["term"] >= new_term, view
            if final_id != leader_id:
                assert not view["coordinating"], view
                assert leader.metric("gridmesh_cluster_coordinating", cluster=C) == 0
            # its own old command, replayed to it, is stale to it now
            own = stale_refusals(leader)
            assert await worker.send(leader, sent) == "stale_term"
            assert stale_refusals(leader) >= own + 1
            # whatever it sent after it woke in its old term: refused by every member
            late = [
                r.command
                for r in worker.received
                if r.at >= resumed and r.command.signer == leader_id and r.command.term < new_term
            ]
            for cmd in late:
                for d in rest:
                    assert await worker.send(d, cmd) == "stale_term"
            # the worker, a member like any other, is told of the coordinators that follow
            await until(
                lambda: any(r.command.term >= new_term for r in worker.received),
                15,
                f"an announcement of term {new_term} or later to the worker\n{_logs(daemons)}",
            )
            print(
                f"old term {term}, new term {new_term}, term {final_term} when all agreed "
                f"again; {len(late)} command(s) from the woken coordinator in its old term"
            )
