"""Paid work in a daemon: the parts `daemon.node` builds when this node has an Escrow.

A node reaches the chain when its home holds a deployment record for its `[chain] network`
(`gridmesh chain deploy`); without one it has no Escrow and does no paid work (a paid session
or a paid generation is refused with a clear error; free work goes on as before). With one,
it is a provider (`Provider`: receipts, vouchers, settlement; HOME/payments.db) and a requester
(`Requester`: receipt checks, vouchers; the job book HOME/jobs.db) at once, both with the key
the Escrow transacts with: GRIDMESH_CHAIN_KEY if set, else the node's payout key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from contracts.eip712 import Signer, address_from_hex
from daemon.payments import wire
from daemon.payments.jobs import JobBook
from daemon.payments.provider import Provider
from daemon.payments.requester import Requester
from daemon.payments.store import STORE_FILE, PaymentStore

if TYPE_CHECKING:
    from daemon.payments.escrow import Escrow
    from daemon.settings import Config
    from p2p.identity import NodeIdentity
    from p2p.network import Network

log = logging.getLogger(__name__)

KEY_ENV = "GRIDMESH_CHAIN_KEY"
MAX_PAYOUTS = 4096  # payout addresses of peers remembered


def chain_key(ident: NodeIdentity) -> str:
    """The key this node transacts and signs receipts and vouchers with."""
    return os.environ.get(KEY_ENV, "").strip() or "0x" + ident.payout_key.hex()


def escrow_from_home(home: Path, config: Config, ident: NodeIdentity) -> Escrow | None:
    """The Escrow of the deployment recorded in `home` for `[chain] network`; None when none
    is recorded or it cannot be used (logged): this node then does no paid work."""
    from contracts.chain.records import record_path

    network = config.chain.network
    if not record_path(home, network).exists():
        log.info(
            "unpaid: no contracts recorded for chain network %r (gridmesh chain use --escrow "
            "ADDRESS for a published deployment, or gridmesh chain deploy --network %s); this "
            "node serves and requests work without payment",
            network,
            network,
        )
        return None
    from contracts.chain.client import ChainClient
    from contracts.chain.networks import endpoint
    from daemon.payments.escrow import Escrow

    try:
        _, url = endpoint(network, config.chain.rpc_url or None)
        client = ChainClient(url, chain_key(ident))
    except Exception as exc:  # ChainError: no usable endpoint or key: paid work off, with why
        log.warning("no paid work: the chain is not usable: %s", exc)
        return None
    try:
        return Escrow.from_home(client, home, network)
    except Exception as exc:  # a broken deployment record
        client.close()
        log.warning("no paid work: the chain is not usable: %s", exc)
        return None


@dataclass
class PaidWork:
    """A node's paid work: its Escrow, and its provider and requester sides."""

    escrow: Any
    store: PaymentStore
    book: JobBook
    provider: Provider
    requester: Requester

    async def run(
        self, net: Network, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Answer vouchers and settle, until cancelled."""
        net.set_request_handler(
            wire.VOUCHER_PROTOCOL, self.provider.on_voucher, timeout_s=wire.VOUCHER_TIMEOUT_S
        )
        await self.provider.run(task_status=task_status)

    def close(self) -> None:
        self.store.close()
        self.book.close()


def build(
    escrow: Escrow,
    *,
    home: Path,
    ident: NodeIdentity,
    config: Config,
    net: Network,
    lookup: Callable[[str], Any],
    on_reject: Callable[[str], None],
) -> PaidWork | None:
    """The paid parts around `escrow`; None (logged) when its account is not the key this
    node signs with. `lookup`: peer id -> its verified resource record (or None)."""
    signer = Signer(bytes.fromhex(chain_key(ident).removeprefix("0x")))
    if escrow.address and address_from_hex(escrow.address) != signer.address:
        log.error(
            "the escrow's account %s is not this node's signing key's: no paid work",
            escrow.address,
        )
        return None
    store = PaymentStore(home / STORE_FILE)
    book = JobBook(home)
    payouts: dict[str, bytes] = {}

    async def payout_of(peer_id: str) -> bytes | None:
        if peer_id == ident.peer_id:
            return signer.address
        if peer_id not in payouts:
            record = await lookup(peer_id)
            if record is None:
                return None
            if len(payouts) >= MAX_PAYOUTS:
                payouts.clear()
            payouts[peer_id] = address_from_hex(record.payout_address)
        return payouts[peer_id]

    provider = Provider(
        escrow,
        signer,
        store,
        price_per_unit=config.market.price_per_unit,
        settle_threshold=config.market.settle_threshold,
        payout_of=payout_of,
        on_reject=on_reject,
    )

    async def send(peer_id: str, payload: bytes) -> bytes:
        if peer_id == ident.peer_id:  # our own shard server: no network to ourselves
            return await provider.on_voucher(peer_id, payload)
        return await net.request(
            peer_id, wire.VOUCHER_PROTOCOL, payload, timeout_s=wire.VOUCHER_TIMEOUT_S
        )

    async def report(proof: Any) -> None:
        await escrow.report_equivocation(proof.a, proof.b)

    requester = Requester(
        escrow.domain, signer, book, send=send, payout_of=payout_of, report=report
    )
    return PaidWork(escrow, store, book, provider, requester)
