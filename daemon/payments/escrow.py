"""The daemon's side of the contracts: `Escrow`, one node's account on JobEscrow,
ProviderRegistry, ReputationRegistry and the token, over one `ChainClient`.

The client carries the key the node transacts with (the daemon passes its payout key, the
account bound to its peer id); `Escrow.address` is that account. The deployment record is the
one `gridmesh chain deploy` writes (`contracts.chain.records`): it names the four contracts and
the chain id, which with JobEscrow's address is the EIP-712 domain receipts and vouchers are
signed in.

Every failure is a `contracts.chain.errors.ChainError`; a revert is a `ContractRevert` named by
its custom error ("JobEscrow.settle: reverted with StaleVoucher(...)"). `explain()` adds what
to do about the usual ones, for messages shown to people.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.chain.errors import ChainError, ContractRevert
from contracts.eip712 import Domain, SignedReceipt, SignedVoucher, to_checksum_address

if TYPE_CHECKING:
    from contracts.chain.client import Bound, ChainClient, TxResult
    from contracts.chain.records import DeploymentRecord

CONTRACT_NAMES = ("TestUSD", "ReputationRegistry", "ProviderRegistry", "JobEscrow")
JOB_CACHE_S = 2.0  # how long a job read from the chain is trusted before it is read again
ZERO_ADDRESS = "0x" + "00" * 20

# what to do about the reverts people meet most (custom error name -> advice)
_ADVICE = {
    "ProviderNotActive": "the provider must be registered and staked at least the minimum "
    "(`gridmesh stake AMOUNT`)",
    "NotRegistered": "register first: `gridmesh stake AMOUNT` registers this node's peer id",
    "ERC20InsufficientBalance": "not enough tUSD in this account (`gridmesh wallet`): on a "
    "devnet `gridmesh fund` gives some",
    "DeadlineNotReached": "a job is refunded only after its deadline (`gridmesh job status`)",
    "DeadlinePassed": "the job's deadline has passed: nothing more can be settled; the payer "
    "may refund the rest",
    "AlreadyRefunded": "this job was refunded already",
    "UnknownJob": "no such job on this chain (another network, or a chain restarted since?)",
    "JobExists": "that job id is taken: job ids are used once",
    "UnbondingNotOver": "the unbonding delay is not over yet (`gridmesh withdraw` shows when)",
    "NothingUnbonding": "nothing is unbonding: `gridmesh unstake AMOUNT` first",
    "InsufficientStake": "that is more than the active stake",
    "MintCapExceeded": "the faucet mints at most its cap per call",
    "StaleVoucher": "that voucher (or a newer one) was settled already",
    "OverDeposit": "the voucher asks more than the job's deposit holds",
}


@dataclass(frozen=True)
class OnChainJob:
    """JobEscrow's view of a job."""

    job_id: bytes  # 32
    payer: str  # checksummed address
    deposit: int
    paid: int  # to all providers, fees included
    max_price_per_unit: int
    deadline: int  # unix seconds (chain time)
    refunded: bool

    @property
    def remaining(self) -> int:
        """What the payer has not been charged (zero once refunded)."""
        return 0 if self.refunded else self.deposit - self.paid


@dataclass(frozen=True)
class StakeInfo:
    """A provider's standing in ProviderRegistry."""

    registered: bool
    peer_id: str  # "" when not registered
    stake: int  # active
    unbonding: int
    unbonding_ready_at: int  # unix seconds; 0 when nothing unbonds
    active: bool  # registered, not slashed, stake >= the registry's minimum
    slashed: bool
    min_stake: int


def explain(exc: ChainError) -> str:
    """`exc` as one line for a person: the named revert plus what to do about it."""
    text = str(exc)
    if isinstance(exc, ContractRevert) and exc.error_name in _ADVICE:
        return f"{text}: {_ADVICE[exc.error_name]}"
    return text


def job_id_from_hex(text: str) -> bytes:
    """A job id given as 64 hex digits (0x optional); ValueError says what is wrong."""
    value = text.strip().removeprefix("0x").removeprefix("0X")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"job id {text!r} is not hex") from None
    if len(raw) != 32:
        raise ValueError(f"a job id is 32 bytes (64 hex digits), not {len(raw)}")
    return raw


def job_id_hex(job_id: bytes) -> str:
    return "0x" + job_id.hex()


def _record_json(record: Mapping[str, Any] | DeploymentRecord) -> dict[str, Any]:
    as_json = getattr(record, "as_json", None)
    return as_json() if callable(as_json) else dict(record)


class Escrow:
    """JobEscrow, ProviderRegistry, ReputationRegistry and the token, for one node's key."""

    def __init__(
        self,
        client: ChainClient,
        deployment_record: Mapping[str, Any] | DeploymentRecord,
        *,
        cache_s: float = JOB_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        record = _record_json(deployment_record)
        addresses = record.get("addresses")
        chain_id = record.get("chainId")
        if not isinstance(addresses, Mapping) or not isinstance(chain_id, int):
            raise ChainError("the deployment record has no addresses or chainId: redeploy")
        missing = [name for name in CONTRACT_NAMES if not addresses.get(name)]
        if missing:
            raise ChainError(
                f"the deployment record names no {', '.join(missing)}: redeploy with "
                "`gridmesh chain deploy --force`"
            )
        self.client = client
        self.network = str(record.get("network", ""))
        self.chain_id = chain_id
        self.token: Bound = client.bind("TestUSD", addresses["TestUSD"])
        self.reputation: Bound = client.bind("ReputationRegistry", addresses["ReputationRegistry"])
        self.providers: Bound = client.bind("ProviderRegistry", addresses["ProviderRegistry"])
        self.escrow: Bound = client.bind("JobEscrow", addresses["JobEscrow"])
        self.domain = Domain(chain_id, bytes.fromhex(self.escrow.address[2:]))
        self.address: str = client.address or ""
        self._cache_s = cache_s
        self._clock = clock
        self._jobs: dict[bytes, tuple[float, OnChainJob]] = {}

    @classmethod
    def from_home(cls, client: ChainClient, home: Path, network: str, **kwargs: Any) -> Escrow:
        """The escrow of the deployment recorded for `network` in `home`; ChainError says how
        to make one when there is none."""
        from contracts.chain.records import read_record, record_path

        record = read_record(home, network)
        if record is None:
            raise ChainError(
                f"no chain configured: no deployment recorded in {record_path(home, network)}; "
                f"run `gridmesh chain deploy --network {network}` (after `gridmesh chain serve` "
                "for a devnet), or `gridmesh chain use --escrow ADDRESS` for a deployment "
                "someone published"
            )
        return cls(client, record, **kwargs)

    async def check(self) -> None:
        """ChainError unless the endpoint is the recorded chain and JobEscrow is there (a dev
        chain restarted since the deployment forgets it)."""
        chain_id = await self.client.chain_id()
        if chain_id != self.chain_id:
            raise ChainError(
                f"the endpoint {self.client.rpc_url} is chain id {chain_id}, but the deployment "
                f"record is of chain id {self.chain_id}: wrong [chain] rpc_url, or redeploy"
            )
        address = self.escrow.address
        code = await self.client.run(lambda w3: bytes(w3.eth.get_code(address)))
        if not code:
            raise ChainError(
                f"no JobEscrow at {address} on {self.client.rpc_url} (a dev chain restarted "
                "since the deployment?): run `gridmesh chain deploy --force`"
            )

    async def chain_time(self) -> int:
        """The latest block's timestamp: the clock deadlines are checked against (a dev chain's
        runs ahead of the wall clock after evm_increaseTime)."""
        return await self.client.run(lambda w3: int(w3.eth.get_block("latest")["timestamp"]))

    # -- jobs --------------------------------------------------------------------------------

    async def job(self, job_id: bytes, *, fresh: bool = False) -> OnChainJob | None:
        """The job as JobEscrow has it, None when unknown. Read again after `cache_s` (or
        when `fresh`); a job this escrow transacts on is read again at once."""
        _check_job_id(job_id)
        now = self._clock()
        cached = self._jobs.get(job_id)
        if cached is not None and not fresh and now - cached[0] < self._cache_s:
            return cached[1]
        payer, deadline, refunded, deposit, paid, max_price = await self.client.call(
            self.escrow, "jobs", job_id
        )
        if int(payer, 16) == 0:
            return None  # unknown jobs are not cached: one may be deposited any moment
        job = OnChainJob(
            job_id=job_id,
            payer=payer,
            deposit=int(deposit),
            paid=int(paid),
            max_price_per_unit=int(max_price),
            deadline=int(deadline),
            refunded=bool(refunded),
        )
        self._jobs[job_id] = (now, job)
        if len(self._jobs) > 4096:  # forget the stalest half
            for key, _ in sorted(self._jobs.items(), key=lambda kv: kv[1][0])[:2048]:
                del self._jobs[key]
        return job

    async def deposit(
        self, job_id: bytes, amount: int, max_price_per_unit: int, deadline: int
    ) -> TxResult:
        """Lock `amount` of the token for `job_id` until `deadline` (unix seconds, chain
        time), paid by this node's account; approves JobEscrow for it first when needed."""
        _check_job_id(job_id)
        if amount <= 0:
            raise ChainError(f"a deposit must be positive, not {amount}")
        await self._approve(self.escrow.address, amount)
        self._jobs.pop(job_id, None)
        return await self.client.transact(
            self.escrow, "deposit", job_id, amount, max_price_per_unit, deadline
        )

    async def settle(self, signed: SignedVoucher) -> TxResult:
        """Settle the payer's voucher (pays its provider the increase, less the fee)."""
        voucher = signed.voucher
        as_abi = (
            voucher.job_id,
            to_checksum_address(voucher.provider),
            voucher.cumulative_amount,
            voucher.receipts_root,
            voucher.nonce,
        )
        self._jobs.pop(voucher.job_id, None)
        return await self.client.transact(self.escrow, "settle", as_abi, signed.signature)

    async def refund(self, job_id: bytes) -> TxResult:
        """Return what the job did not spend to its payer (after the deadline, once)."""
        _check_job_id(job_id)
        self._jobs.pop(job_id, None)
        return await self.client.transact(self.escrow, "refund", job_id)

    async def paid(self, job_id: bytes, provider: str) -> int:
        """What `provider` was paid for the job so far, fees included."""
        return int(await self.client.call(self.escrow, "paid", job_id, _checksum(provider)))

    async def last_nonce(self, job_id: bytes, provider: str) -> int:
        return int(await self.client.call(self.escrow, "lastNonce", job_id, _checksum(provider)))

    async def report_equivocation(self, a: SignedReceipt, b: SignedReceipt) -> TxResult:
        """Prove that a provider signed two results for one step (slashes its stake)."""

        def as_abi(signed: SignedReceipt) -> tuple[Any, ...]:
            values = list(signed.receipt.abi_tuple())
            values[1] = to_checksum_address(values[1])
            return tuple(values)

        return await self.client.transact(
            self.escrow, "reportEquivocation", as_abi(a), a.signature, as_abi(b), b.signature
        )

    async def fee(self) -> tuple[int, str]:
        """(fee in basis points, fee recipient)."""
        bps = await self.client.call(self.escrow, "feeBps")
        recipient = await self.client.call(self.escrow, "feeRecipient")
        return int(bps), str(recipient)

    # -- providers ---------------------------------------------------------------------------

    async def register(self, peer_id: str) -> TxResult | None:
        """Bind this account to `peer_id` (its UTF-8 text) in ProviderRegistry. Idempotent:
        None when it is bound already; ChainError when bound to another peer id."""
        if not peer_id:
            raise ChainError("register needs a peer id")
        current = await self.client.call(self.providers, "peerIdOf", self._me())
        if current:
            if bytes(current) == peer_id.encode():
                return None
            raise ChainError(
                f"{self.address} is registered already, for peer id "
                f"{bytes(current).decode(errors='replace')!r}, not {peer_id!r}: a payout "
                "address serves one peer id for good"
            )
        return await self.client.transact(self.providers, "register", peer_id.encode())

    async def stake(self, amount: int) -> TxResult:
        """Add `amount` to this account's active stake (approves the registry first)."""
        if amount <= 0:
            raise ChainError(f"a stake must be positive, not {amount}")
        await self._approve(self.providers.address, amount)
        return await self.client.transact(self.providers, "stake", amount)

    async def request_unstake(self, amount: int) -> TxResult:
        """Move `amount` of active stake to unbonding (withdrawable after the delay)."""
        if amount <= 0:
            raise ChainError(f"an amount to unstake must be positive, not {amount}")
        return await self.client.transact(self.providers, "requestUnstake", amount)

    async def withdraw_unstaked(self) -> TxResult:
        """Pay out the stake whose unbonding delay is over."""
        return await self.client.transact(self.providers, "withdrawUnstaked")

    async def stake_info(self, address: str | None = None) -> StakeInfo:
        who = _checksum(address) if address else self._me()
        peer_id = bytes(await self.client.call(self.providers, "peerIdOf", who))
        stake = await self.client.call(self.providers, "stakeOf", who)
        unbonding, ready_at = await self.client.call(self.providers, "unbondingOf", who)
        active = await self.client.call(self.providers, "isActive", who)
        slashed = await self.client.call(self.providers, "isSlashed", who)
        min_stake = await self.client.call(self.providers, "minStake")
        return StakeInfo(
            registered=bool(peer_id),
            peer_id=peer_id.decode(errors="replace"),
            stake=int(stake),
            unbonding=int(unbonding),
            unbonding_ready_at=int(ready_at),
            active=bool(active),
            slashed=bool(slashed),
            min_stake=int(min_stake),
        )

    async def is_active(self, address: str | None = None) -> bool:
        who = _checksum(address) if address else self._me()
        return bool(await self.client.call(self.providers, "isActive", who))

    async def reputation_of(self, address: str | None = None) -> int:
        who = _checksum(address) if address else self._me()
        return int(await self.client.call(self.reputation, "scoreOf", who))

    # -- the token and gas -------------------------------------------------------------------

    async def token_balance(self, address: str | None = None) -> int:
        """tUSD (smallest units) held by `address`, this account's by default."""
        who = _checksum(address) if address else self._me()
        return int(await self.client.call(self.token, "balanceOf", who))

    async def mint(self, amount: int, to: str | None = None) -> TxResult:
        """TestUSD's faucet (devnets and testnets): `amount` to `to`, this account by default."""
        if amount <= 0:
            raise ChainError(f"an amount to mint must be positive, not {amount}")
        who = _checksum(to) if to else self._me()
        return await self.client.transact(self.token, "mint", who, amount)

    async def gas_balance(self, address: str | None = None) -> int:
        """The native balance (wei) that pays for gas."""
        return await self.client.balance_of(_checksum(address) if address else self._me())

    async def send_gas(self, to: str, wei: int) -> TxResult:
        """Send `wei` of the native coin from this account (a dev account funding a node)."""
        return await self.client.send_value(_checksum(to), wei)

    async def _approve(self, spender: str, amount: int) -> None:
        allowance = await self.client.call(self.token, "allowance", self._me(), spender)
        if int(allowance) < amount:
            await self.client.transact(self.token, "approve", spender, amount)

    def _me(self) -> str:
        if not self.address:
            raise ChainError("this escrow's chain client has no key: it can only read jobs")
        return self.address


def _check_job_id(job_id: bytes) -> None:
    if not isinstance(job_id, bytes) or len(job_id) != 32:
        raise ChainError("a job id is 32 bytes")


def _checksum(address: str) -> str:
    from web3 import Web3

    try:
        return Web3.to_checksum_address(address)
    except (ValueError, TypeError):
        raise ChainError(f"{address!r} is not an address") from None
