"""The paid-work JSON-RPC methods: job_create, job_status, job_refund, job_list, earnings,
stake, unstake, withdraw, wallet.

`Payments` is what they work with: this node's home, its peer id, its job book and at most one
`Escrow` (open_payments makes it when `[chain] network` has a deployment recorded in the home,
HOME/chain/NETWORK.json, written by `gridmesh chain deploy`; its account is the node's payout
key). Without one, the methods that need the chain answer a FailedPrecondition that says how
to get one; free work is not affected. Chain failures become the daemon's error kinds: a revert
is a FailedPrecondition naming its custom error (data `reason`), an endpoint that does not
answer is Unavailable.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

from msgspec import Meta

from daemon.errors import FailedPrecondition, InvalidParams, NotFound, Unavailable

if TYPE_CHECKING:
    from daemon.api.jsonrpc import Dispatcher
    from daemon.payments.escrow import Escrow
    from daemon.payments.jobs import JobBook
    from daemon.settings import Config

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

MAX_AMOUNT = (1 << 63) - 1  # what a JSON-RPC integer parameter carries here

JobHex = Annotated[str, Meta(description="the job id: 0x + 64 hex digits", max_length=70)]
Amount = Annotated[
    int, Meta(ge=1, le=MAX_AMOUNT, description="tUSD in its smallest unit (6 decimals)")
]
Spec = Annotated[
    dict[str, Any],
    Meta(
        description="a job spec: {name, model, billing: {deposit | deposit_usd | "
        "max_price_per_hour_usd, max_price_per_unit, deadline_s}, resources} (gridmesh's "
        "fields or OpenGrid's job.yaml)"
    ),
]


def no_chain_message(home: Path, network: str) -> str:
    return (
        f"no chain configured: no deployment of [chain] network {network!r} is recorded in "
        f"{home}/chain/{network}.json; run `gridmesh chain deploy --network {network} --home "
        f"{home}` (for a devnet, `gridmesh chain serve` first), or `gridmesh chain use --escrow "
        "ADDRESS` for a deployment someone published, then restart the daemon"
    )


@dataclass
class Payments:
    """This node's paid-work state: its escrow (None without a chain), its job book."""

    home: Path
    peer_id: str
    escrow: Escrow | None
    network: str = "devnet"
    default_max_price: int | None = None
    why_no_escrow: str = ""
    _book: JobBook | None = field(default=None, repr=False)
    owned: bool = True  # close() closes the escrow's client and the book

    @classmethod
    def of_daemon(cls, daemon: Any) -> Payments:
        """The Payments of a `daemon.node.Daemon`: its Escrow (None without a chain) and the
        job book its paid work (daemon.payments.wiring) already holds; the daemon closes
        them."""
        paid = getattr(daemon, "paid", None)
        return cls(
            daemon.home,
            daemon.ident.peer_id,
            getattr(daemon, "escrow", None),
            daemon.config.chain.network,
            daemon.config.market.max_price_per_unit,
            _book=paid.book if paid is not None else None,
            owned=paid is None,
        )

    @property
    def book(self) -> JobBook:
        if self._book is None:
            from daemon.payments.jobs import JobBook

            self._book = JobBook(self.home)
        return self._book

    def need_escrow(self) -> Escrow:
        if self.escrow is None:
            raise FailedPrecondition(
                self.why_no_escrow or no_chain_message(self.home, self.network),
                {"reason": "no_chain"},
            )
        return self.escrow

    def close(self) -> None:
        if self.escrow is not None and self.owned:
            self.escrow.client.close()
        if self._book is not None and (self.owned or self.escrow is None):
            self._book.close()


def open_payments(home: Path, config: Config, peer_id: str, payout_key: bytes) -> Payments:
    """The daemon's Payments: an Escrow over a ChainClient signing with `payout_key` when a
    deployment of `[chain] network` is recorded in `home`, else none (and why)."""
    network = config.chain.network
    default_max = config.market.max_price_per_unit
    if not (home / "chain" / f"{network}.json").exists():
        return Payments(home, peer_id, None, network, default_max)
    try:
        from contracts.chain import networks
        from contracts.chain.client import ChainClient
        from daemon.payments.escrow import Escrow

        _, url = networks.endpoint(network, config.chain.rpc_url)
        client = ChainClient(url, "0x" + payout_key.hex())
        try:
            escrow = Escrow.from_home(client, home, network)
        except BaseException:
            client.close()
            raise
    except Exception as exc:  # ChainError, a broken record: paid work off, with why
        why = f"the chain is not usable: {exc}"
        log.warning("%s", why)
        return Payments(home, peer_id, None, network, default_max, why)
    log.info(
        "paid work on %s at %s: JobEscrow %s, account %s",
        network,
        url,
        escrow.escrow.address,
        escrow.address,
    )
    return Payments(home, peer_id, escrow, network, default_max)


def chain_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """A chain failure as the daemon's error kinds (see the module docstring)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from contracts.chain.errors import ChainError, ChainUnreachable, ContractRevert
        from daemon.payments.escrow import explain
        from daemon.payments.job_spec import JobSpecError
        from daemon.payments.jobs import JobBookError

        try:
            return await fn(*args, **kwargs)
        except ContractRevert as exc:
            raise FailedPrecondition(explain(exc), {"reason": exc.error_name}) from None
        except ChainUnreachable as exc:
            raise Unavailable(str(exc), {"reason": "chain_unreachable"}) from None
        except ChainError as exc:
            raise Unavailable(str(exc), {"reason": "chain"}) from None
        except (JobSpecError, JobBookError) as exc:
            raise InvalidParams(str(exc)) from None

    return wrapper


def _job_id(text: str) -> bytes:
    from daemon.payments.escrow import job_id_from_hex

    try:
        return job_id_from_hex(text)
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None


def _stake_json(info: Any) -> dict[str, Any]:
    return {
        "registered": info.registered,
        "peer_id": info.peer_id,
        "stake": info.stake,
        "unbonding": info.unbonding,
        "unbonding_ready_at": info.unbonding_ready_at,
        "active": info.active,
        "slashed": info.slashed,
        "min_stake": info.min_stake,
    }


def register_payment_methods(dispatcher: Dispatcher, payments: Payments) -> None:
    @chain_errors
    async def job_create(spec: Spec) -> dict[str, Any]:
        """Deposit for a new paid job and record it in this node's job book; returns its id
        (pass it as `job_id` to generate)."""
        from daemon.payments.job_spec import parse_job_spec
        from daemon.payments.jobs import create_job

        escrow = payments.need_escrow()
        parsed = parse_job_spec(spec, default_max_price_per_unit=payments.default_max_price)
        job = await create_job(payments.book, escrow, parsed)
        return {**job.as_json(), "payer": escrow.address}

    @chain_errors
    async def job_status(job: JobHex) -> dict[str, Any]:
        """A job as this node's job book and the escrow know it: deposit, paid, remaining,
        deadline, refunded, and per provider what was acknowledged and what was settled."""
        from daemon.payments.jobs import reconcile

        job_id = _job_id(job)
        book = payments.book
        escrow = payments.escrow
        local = await book.run(lambda: book.get(job_id, include_pending=True))
        if local is not None and escrow is not None:
            local = await reconcile(book, escrow, job_id)
        acked = await book.run(book.acknowledged, job_id)
        out: dict[str, Any] = {
            "job_id": "0x" + job_id.hex(),
            "book": local.as_json() if local is not None else None,
            "chain": None,
            "providers": [
                {"provider": a.provider, "acknowledged": a.cumulative, "nonce": a.nonce}
                for a in acked.values()
            ],
        }
        if escrow is None:
            if local is None:
                raise NotFound(f"job {job} is not in this node's job book")
            out["chain_error"] = payments.why_no_escrow or no_chain_message(
                payments.home, payments.network
            )
            return out
        on_chain = await escrow.job(job_id, fresh=True)  # a person asking: no cached view
        if on_chain is None and local is None:
            raise NotFound(f"job {job} is neither in this node's job book nor on the chain")
        out["chain_time"] = await escrow.chain_time()
        if on_chain is not None:
            out["chain"] = {
                "payer": on_chain.payer,
                "deposit": on_chain.deposit,
                "paid": on_chain.paid,
                "remaining": on_chain.remaining,
                "max_price_per_unit": on_chain.max_price_per_unit,
                "deadline": on_chain.deadline,
                "refunded": on_chain.refunded,
            }
            for entry in out["providers"]:
                entry["settled"] = await escrow.paid(job_id, entry["provider"])
        return out

    @chain_errors
    async def job_refund(job: JobHex) -> dict[str, Any]:
        """Take back what a job did not spend (after its deadline, once)."""
        escrow = payments.need_escrow()
        job_id = _job_id(job)
        result = await escrow.refund(job_id)
        events = result.named("Refunded")
        amount = int(events[0].args["amount"]) if events else 0
        return {"job_id": "0x" + job_id.hex(), "refunded": amount, "tx": result.tx_hash}

    @chain_errors
    async def job_list() -> list[dict[str, Any]]:
        """The jobs this node created (its job book), newest first."""
        book = payments.book
        return [job.as_json() for job in await book.run(book.list)]

    @chain_errors
    async def earnings(history: bool = False) -> dict[str, Any]:
        """What this node earned as a provider, per job: receipts signed, acknowledged,
        settled and pending; with `history`, also those totals over time (at most about 240
        points); with its token balance and stake when a chain is configured."""
        import trio

        from daemon.payments.store import earnings as store_earnings
        from daemon.payments.store import earnings_history

        jobs = await trio.to_thread.run_sync(store_earnings, payments.home)
        out: dict[str, Any] = {"jobs": jobs}
        if history:
            out["history"] = await trio.to_thread.run_sync(earnings_history, payments.home)
        if payments.escrow is None:
            out["chain_error"] = payments.why_no_escrow or no_chain_message(
                payments.home, payments.network
            )
            return out
        out.update(await _wallet(payments.escrow))
        return out

    @chain_errors
    async def wallet() -> dict[str, Any]:
        """This node's account on the chain: address, gas and tUSD balances, stake."""
        return await _wallet(payments.need_escrow())

    @chain_errors
    async def stake(amount: Amount) -> dict[str, Any]:
        """Register this node's peer id with its payout address (once) and add `amount` to
        its stake; a provider is paid only while its stake is at least the minimum."""
        escrow = payments.need_escrow()
        registered = await escrow.register(payments.peer_id)
        result = await escrow.stake(amount)
        info = _stake_json(await escrow.stake_info())
        return {**info, "newly_registered": registered is not None, "tx": result.tx_hash}

    @chain_errors
    async def unstake(amount: Amount) -> dict[str, Any]:
        """Move `amount` of stake to unbonding; `withdraw` pays it out after the delay."""
        escrow = payments.need_escrow()
        result = await escrow.request_unstake(amount)
        return {**_stake_json(await escrow.stake_info()), "tx": result.tx_hash}

    @chain_errors
    async def withdraw() -> dict[str, Any]:
        """Pay out the stake whose unbonding delay is over, to this node's payout address."""
        escrow = payments.need_escrow()
        info = await escrow.stake_info()
        if info.unbonding == 0:
            raise FailedPrecondition(
                "nothing is unbonding: `gridmesh unstake AMOUNT` first", {"reason": "nothing"}
            )
        now = await escrow.chain_time()
        if now < info.unbonding_ready_at:
            raise FailedPrecondition(
                f"{info.unbonding} is unbonding until chain time {info.unbonding_ready_at} "
                f"({info.unbonding_ready_at - now} s from now)",
                {"reason": "unbonding", "ready_at": info.unbonding_ready_at},
            )
        result = await escrow.withdraw_unstaked()
        return {
            "withdrawn": info.unbonding,
            "balance": await escrow.token_balance(),
            "tx": result.tx_hash,
        }

    for handler in (
        job_create,
        job_status,
        job_refund,
        job_list,
        earnings,
        wallet,
        stake,
        unstake,
        withdraw,
    ):
        dispatcher.register(handler.__name__, handler)


async def _wallet(escrow: Escrow) -> dict[str, Any]:
    return {
        "address": escrow.address,
        "network": escrow.network,
        "chain_id": escrow.chain_id,
        "escrow": escrow.escrow.address,
        "token": escrow.token.address,
        "balance": await escrow.token_balance(),
        "gas_balance": await escrow.gas_balance(),
        "stake": _stake_json(await escrow.stake_info()),
    }
