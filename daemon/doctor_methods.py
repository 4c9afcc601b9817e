"""The daemon's side of `gridmesh doctor`: the `node_doctor` JSON-RPC method and the
`/gridmesh/doctor/1.0.0` request protocol peers answer it with.

`node_doctor` gathers what only the running node knows and hands it to the verdicts of
`daemon.doctor`: its listen addresses and reachability, whether each configured bootstrap
peer is connected or can be dialled, its clock against its peers', a DHT put of its own
resource record read back by peers, the chain (chain id, payout balance and stake, code at
the recorded contract addresses) and the GPUs detected.

The protocol: a request is one msgpack map {op: "time" | "record"}; the answer
{time: the answerer's wall clock, issued_at: for "record", the issue time of the asker's own
resource record as the answerer finds it in the DHT, else None}. A peer can only have its own
record looked up (the key comes from its authenticated peer id), at most
`MAX_LOOKUPS` at a time on this node; a malformed request is refused and counted in
/metrics (`gridmesh_rejected_messages_total{source="doctor"}`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import trio

from daemon import doctor
from daemon.doctor import BootstrapResult, Check, ClockSample
from p2p.network import NetworkError

if TYPE_CHECKING:
    from daemon.api.jsonrpc import Dispatcher

log = logging.getLogger(__name__)

DOCTOR_PROTOCOL = "/gridmesh/doctor/1.0.0"
MAX_REQUEST_BYTES = 64
ANSWER_TIMEOUT_S = 10.0  # a "record" answer waits for a DHT get (dht_timeout_s, 5 s default)
MAX_LOOKUPS = 4  # "record" look-ups answered at once, for all peers together
PEERS_ASKED = 5  # the clock and the DHT line ask this many connected peers
DIAL_TIMEOUT_S = 5.0
CHAIN_TIMEOUT_S = 20.0


class Ask(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: Literal["time", "record"]


class Answer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    time: float
    issued_at: float | None = None


def decode_ask(payload: bytes) -> Ask:
    """A peer's request, or ValueError saying why not."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise ValueError("too_large")
    try:
        return msgspec.msgpack.decode(payload, type=Ask)
    except msgspec.DecodeError:
        raise ValueError("malformed") from None


def decode_answer(payload: bytes) -> Answer:
    if len(payload) > MAX_REQUEST_BYTES:
        raise ValueError("answer too large")
    try:
        return msgspec.msgpack.decode(payload, type=Answer)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed answer: {exc}") from None


class DoctorService:
    """`node_doctor` for one daemon (a `daemon.node.Daemon`), and its peers' answers."""

    def __init__(self, daemon: Any) -> None:
        self._d = daemon
        self._lookups = 0  # "record" look-ups being answered

    # -- the protocol, serving peers ------------------------------------------------------------

    async def answer(self, sender: str, payload: bytes) -> bytes:
        net, metrics = self._d.net, self._d.metrics
        try:
            ask = decode_ask(payload)
        except ValueError as exc:
            metrics.reject("doctor", str(exc))
            raise NetworkError(f"doctor request refused: {exc}") from None
        issued_at = None
        if ask.op == "record":
            if self._lookups >= MAX_LOOKUPS:
                metrics.reject("doctor", "busy")
                raise NetworkError("doctor: too many look-ups at once")
            self._lookups += 1
            try:
                record = await self._d.directory.lookup(sender)
            finally:
                self._lookups -= 1
            issued_at = None if record is None else record.issued_at
        return msgspec.msgpack.encode(Answer(net.now(), issued_at))

    # -- node_doctor ----------------------------------------------------------------------------

    async def run(self) -> list[Check]:
        """Every daemon line, in `doctor.DAEMON_CHECKS` order; the slow ones at once."""
        net = self._d.net
        out: dict[str, list[Check]] = {}

        async def into(key: str, fn: Any) -> None:
            out[key] = await fn()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(into, "bootstrap", self._bootstrap)
            nursery.start_soon(into, "chain", self._chain)
        # after the bootstrap dials: peers that came back count for the clock and the DHT
        async with trio.open_nursery() as nursery:
            nursery.start_soon(into, "clock", self._clock)
            nursery.start_soon(into, "dht", self._dht)
        reach = getattr(net, "reachability", None)
        observed = getattr(net, "observed_addrs", None)
        return [
            doctor.listen_verdict(net.listen_addrs()),
            doctor.reachability_verdict(
                reach() if callable(reach) else None, observed() if callable(observed) else ()
            ),
            *out["bootstrap"],
            *out["clock"],
            *out["dht"],
            *out["chain"],
            doctor.gpus_verdict(self._d.resources or {}),
        ]

    def _connected(self) -> list[str]:
        net = self._d.net
        return sorted(net.connected_peers() & net.known_peers())[:PEERS_ASKED]

    async def _ask(self, peer_id: str, op: str) -> tuple[float, Answer, float] | None:
        net = self._d.net
        payload = msgspec.msgpack.encode(Ask(op))  # type: ignore[arg-type]
        sent = net.now()
        try:
            raw = await net.request(peer_id, DOCTOR_PROTOCOL, payload, timeout_s=ANSWER_TIMEOUT_S)
            answer = decode_answer(raw)
        except (NetworkError, ValueError) as exc:
            log.debug("doctor %s to %s: %s", op, peer_id, exc)
            return None
        return sent, answer, net.now()

    async def _bootstrap(self) -> list[Check]:
        net = self._d.net
        results: list[BootstrapResult] = []

        async def probe(addr: str) -> None:
            peer_id = addr.rsplit("/p2p/", 1)[-1]
            if peer_id in net.connected_peers():
                results.append(BootstrapResult(addr, True))
                return
            try:
                with trio.fail_after(DIAL_TIMEOUT_S + 1):
                    await net.connect(addr, timeout_s=DIAL_TIMEOUT_S)
            except (NetworkError, OSError, ValueError, trio.TooSlowError) as exc:
                results.append(BootstrapResult(addr, False, str(exc) or type(exc).__name__))
            else:
                results.append(BootstrapResult(addr, True))

        async with trio.open_nursery() as nursery:
            for addr in self._d.config.p2p.bootstrap:
                nursery.start_soon(probe, addr)
        order = {addr: index for index, addr in enumerate(self._d.config.p2p.bootstrap)}
        return [doctor.bootstrap_verdict(sorted(results, key=lambda r: order[r.addr]))]

    async def _clock(self) -> list[Check]:
        peers = self._connected()
        samples: list[ClockSample] = []

        async def sample(peer_id: str) -> None:
            got = await self._ask(peer_id, "time")
            if got is not None:
                sent, answer, received = got
                offset, error = doctor.clock_offset(sent, answer.time, received)
                samples.append(ClockSample(peer_id, offset, error))

        async with trio.open_nursery() as nursery:
            for peer_id in peers:
                nursery.start_soon(sample, peer_id)
        skew = self._d.config.resources.max_clock_skew_s
        return [doctor.clock_verdict(samples, skew, len(peers))]

    async def _dht(self) -> list[Check]:
        peers = self._connected()
        if not peers:
            return [doctor.dht_verdict(put_ok=False, put_error="", peers=0, found_by=(), asked=0)]
        started = self._d.net.now()
        put_ok = await self._d.directory.publish_once()
        found_by: list[str] = []
        if put_ok:

            async def read_back(peer_id: str) -> None:
                got = await self._ask(peer_id, "record")
                if got is not None and (got[1].issued_at or 0.0) >= started:
                    found_by.append(peer_id)

            async with trio.open_nursery() as nursery:
                for peer_id in peers:
                    nursery.start_soon(read_back, peer_id)
        verdict = doctor.dht_verdict(
            put_ok=put_ok, put_error="", peers=len(peers), found_by=found_by, asked=len(peers)
        )
        return [verdict]

    async def _chain(self) -> list[Check]:
        home: Path = self._d.home
        network = self._d.config.chain.network
        escrow = self._d.escrow
        if escrow is None:
            return doctor.no_chain_verdicts(network, home, self._why_no_escrow(home, network))
        client = escrow.client
        expected = _network_chain_id(network)
        chain_id, error = None, ""
        with trio.move_on_after(CHAIN_TIMEOUT_S) as scope:
            try:  # asked afresh: the client caches the chain id it first saw
                chain_id = await client.run(lambda w3: int(w3.eth.chain_id))
            except Exception as exc:  # ChainUnreachable, ChainError: the line says what
                error = str(exc) or type(exc).__name__
        if scope.cancelled_caught:
            error = f"no answer within {CHAIN_TIMEOUT_S:g} s"
        chain = doctor.chain_verdict(
            network=network,
            url=client.rpc_url,
            chain_id=chain_id,
            error=error,
            expected=expected,
            recorded=escrow.chain_id,
        )
        if error:
            return [chain, *doctor.chain_unreachable_verdicts()]
        return [chain, await self._payout(escrow), await self._contracts(escrow)]

    def _why_no_escrow(self, home: Path, network: str) -> str:
        """Why a recorded deployment gave no escrow ("" when none is recorded)."""
        if not (home / "chain" / f"{network}.json").exists():
            return ""
        from contracts.chain.errors import ChainError
        from contracts.chain.networks import endpoint

        try:
            endpoint(network, self._d.config.chain.rpc_url or None)
        except ChainError as exc:
            return str(exc)
        return "the daemon could not use it (its log says why at start)"

    async def _payout(self, escrow: Any) -> Check:
        try:
            with trio.fail_after(CHAIN_TIMEOUT_S):
                info = await escrow.stake_info()
                gas = await escrow.gas_balance()
                balance = await escrow.token_balance()
        except Exception as exc:  # ChainError, TooSlowError
            return doctor.failed("payout", f"not read: {exc}", "fix the chain line first")
        return doctor.payout_verdict(
            address=escrow.address,
            gas_wei=gas,
            balance=balance,
            stake=info.stake,
            min_stake=info.min_stake,
            registered=info.registered,
            active=info.active,
            slashed=info.slashed,
        )

    async def _contracts(self, escrow: Any) -> Check:
        bound = {
            "TestUSD": escrow.token,
            "ReputationRegistry": escrow.reputation,
            "ProviderRegistry": escrow.providers,
            "JobEscrow": escrow.escrow,
        }
        codes: dict[str, tuple[str, int]] = {}
        try:
            with trio.fail_after(CHAIN_TIMEOUT_S):
                for name, contract in bound.items():
                    address = contract.address
                    code = await escrow.client.run(lambda w3, a=address: bytes(w3.eth.get_code(a)))
                    codes[name] = (address, len(code))
        except Exception as exc:  # ChainError, TooSlowError
            return doctor.contracts_verdict({}, str(exc) or type(exc).__name__)
        return doctor.contracts_verdict(codes)


def _network_chain_id(network: str) -> int | None:
    from contracts.chain.errors import ChainError
    from contracts.chain.networks import get

    try:
        return get(network).chain_id
    except ChainError:
        return None


def register_doctor_methods(dispatcher: Dispatcher, daemon: Any) -> DoctorService:
    """`node_doctor` on the dispatcher, and the doctor protocol on the daemon's network."""
    service = DoctorService(daemon)
    daemon.net.set_request_handler(DOCTOR_PROTOCOL, service.answer, timeout_s=ANSWER_TIMEOUT_S)

    async def node_doctor() -> list[dict[str, str]]:
        """Check this node as `gridmesh doctor` does: listen addresses, reachability,
        bootstrap peers, clock, DHT round trip, chain, payout, contracts, GPUs; each
        {name, status: pass | fail | warn, detail, fix}."""
        return [check.as_json() for check in await service.run()]

    dispatcher.register("node_doctor", node_doctor)
    return service
