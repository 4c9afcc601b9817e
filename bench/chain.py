"""Receipts benchmark: receipts signed and verified per second per core, and the gas of settling
vouchers that cover 10, 100 and 1,000 receipts. Two tables.

Throughput (one process, CPU time from `time.process_time`, so other load on the machine does
not count): a provider's `ReceiptChain` signs `--receipts` receipts of one session (building the
receipt, its EIP-712 digest, a coincurve signature), they cross the wire as msgpack, and the
requester's `ReceiptVerifier` checks each (decoding, digest, recovery, every check of the chain)
and its `Acknowledger` records it. Rows: signing alone, verifying alone (decode + check +
acknowledge), and both, the figure the target is about: >= 2,000 receipts signed and verified
per second per core.

Gas (web3's EthereumTesterProvider in-process, py-evm; the contracts from the committed
artifacts through `contracts.deployment.deploy_all`, one provider staked): for each size, on a
fresh deployment, real receipts are signed, verified and acknowledged and the payer's voucher
over them is settled, three times: the provider's very first settlement (a new job; storage
written from zero), the next voucher of the same job (as many receipts again, cumulative;
storage updated), and the first voucher of another job by a provider that settled before. Gas
is the transaction receipt's `gasUsed`; gas per receipt is that over the receipts the voucher
newly covers. Target: <= 200 gas per receipt at 1,000 receipts per voucher.

usage: python bench/chain.py [--receipts 5000] [--sizes 10 100 1000] [--no-chain]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/registry.py, named like the `registry` package: don't shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from contracts import eip712  # noqa: E402
from contracts.eip712 import Domain, Signer  # noqa: E402
from contracts.receipts import (  # noqa: E402
    Acknowledger,
    JobTerms,
    ReceiptChain,
    ReceiptVerifier,
    activation_hash,
)

RATE_TARGET = 2_000  # receipts signed and verified per second per core
GAS_TARGET = 200  # gas per receipt at GAS_TARGET_SIZE receipts per voucher
GAS_TARGET_SIZE = 1_000
LAYERS = (0, 4)
PRICE = 3  # per unit (layer-token), in the token's smallest unit
MIN_STAKE = 100 * 10**6


@dataclass
class Parties:
    domain: Domain
    provider: Signer
    payer: Signer


def session(parties: Parties, job: bytes, deposit: int, name: str = "bench"):
    chain = ReceiptChain(
        parties.domain,
        parties.provider,
        job_id=job,
        session_id=name,
        model_id="bench-model",
        layer_start=LAYERS[0],
        layer_end=LAYERS[1],
        price_per_unit=PRICE,
    )
    terms = JobTerms(job_id=job, deposit=deposit, max_price_per_unit=PRICE)
    verifier = ReceiptVerifier(
        parties.domain,
        terms,
        provider=parties.provider.address,
        session_id=name,
        model_id="bench-model",
        layers=LAYERS,
    )
    return chain, verifier


def run_receipts(chain: ReceiptChain, verifier: ReceiptVerifier, ack: Acknowledger, n: int):
    """n steps through the whole path; returns (CPU s signing, CPU s verifying)."""
    hashes = [(activation_hash(b"in %d" % i), activation_hash(b"out %d" % i)) for i in range(n)]
    t0 = time.process_time()
    wires = []
    for inp, out in hashes:
        signed = chain.sign_step(input_hash=inp, output_hash=out, tokens=1, timestamp=1_800_000_000)
        wires.append(eip712.encode_signed_receipt(signed))
    t1 = time.process_time()
    for wire, (inp, out) in zip(wires, hashes, strict=True):
        accepted = verifier.check(
            eip712.decode_signed_receipt(wire), input_hash=inp, output_hash=out
        )
        ack.acknowledge(accepted)
    t2 = time.process_time()
    return t1 - t0, t2 - t1


def throughput(n: int) -> list[tuple[str, int, float, int | None]]:
    parties = Parties(
        Domain(131277322940537, b"\x42" * 20), Signer(b"\x11" * 32), Signer(b"\x22" * 32)
    )
    job = b"\x01" * 32
    run_receipts(
        *session(parties, job, 10**30, "warm-up"),
        Acknowledger(parties.domain, job, parties.payer),
        200,
    )
    chain, verifier = session(parties, job, 10**30)
    sign_s, verify_s = run_receipts(
        chain, verifier, Acknowledger(parties.domain, job, parties.payer), n
    )
    return [
        ("sign (+ encode)", n, sign_s, None),
        ("verify (decode, check, acknowledge)", n, verify_s, None),
        ("sign and verify", n, sign_s + verify_s, RATE_TARGET),
    ]


class Escrow:
    """The deployed contracts on an in-process eth-tester chain."""

    def __init__(self) -> None:
        from eth_account import Account
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider, Web3

        from contracts import artifacts, deployment

        backend = PyEVMBackend()
        self.w3 = Web3(EthereumTesterProvider(EthereumTester(backend)))
        keys = [k.to_hex() for k in backend.account_keys[:3]]
        self.deployer, self.payer, self.provider = (Account.from_key(k) for k in keys)
        self.send = deployment.send
        self.d = deployment.deploy_all(
            self.w3, keys[0], min_stake=MIN_STAKE, unbonding_delay_s=3600, half_life_s=86400
        )

        def contract(name: str, address: str) -> Any:
            return self.w3.eth.contract(address=address, abi=artifacts.load(name).abi)

        self.token = contract("TestUSD", self.d.token)
        self.escrow = contract("JobEscrow", self.d.escrow)
        providers = contract("ProviderRegistry", self.d.providers)
        self.parties = Parties(
            Domain(self.w3.eth.chain_id, eip712.address_from_hex(self.d.escrow)),
            Signer(keys[2]),
            Signer(keys[1]),
        )
        mint = self.token.functions.mint
        self.send(self.w3, self.provider, mint(self.provider.address, MIN_STAKE))
        self.send(self.w3, self.provider, self.token.functions.approve(self.d.providers, MIN_STAKE))
        self.send(self.w3, self.provider, providers.functions.register(b"bench provider"))
        self.send(self.w3, self.provider, providers.functions.stake(MIN_STAKE))
        self.send(self.w3, self.payer, mint(self.payer.address, 10**12))
        self.send(self.w3, self.payer, self.token.functions.approve(self.d.escrow, 10**12))
        self.jobs = 0

    def deposit(self, amount: int) -> bytes:
        self.jobs += 1
        job = eip712.keccak(b"bench job %d" % self.jobs)
        deadline = self.w3.eth.get_block("latest")["timestamp"] + 86400
        self.send(self.w3, self.payer, self.escrow.functions.deposit(job, amount, PRICE, deadline))
        return job

    def settle(self, signed: eip712.SignedVoucher) -> int:
        call = self.escrow.functions.settle(signed.voucher.abi_tuple(), signed.signature)
        return self.send(self.w3, self.provider, call)["gasUsed"]


SETTLEMENTS = (
    "provider's first",  # a fresh deployment: a new job, and the provider's first ever
    "same job, next",  # a second, cumulative voucher of that job
    "new job",  # the first voucher of another job, by a provider that settled before
)


def gas(sizes: list[int]) -> list[tuple[int, str, int, int | None]]:
    rows = []
    for n in sizes:
        escrow = Escrow()  # fresh, so that the first row pays every one-time cost
        parties = escrow.parties
        for which in SETTLEMENTS:
            if which != "same job, next":
                deposit = 2 * n * (LAYERS[1] - LAYERS[0]) * PRICE
                job = escrow.deposit(deposit)
                chain, verifier = session(parties, job, deposit)
                ack = Acknowledger(parties.domain, job, parties.payer)
            run_receipts(chain, verifier, ack, n)
            voucher = ack.voucher(parties.provider.address)
            assert voucher is not None
            used = escrow.settle(voucher)
            rows.append((n, which, used, GAS_TARGET if n == GAS_TARGET_SIZE else None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receipts", type=int, default=5000, help="receipts in the throughput run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--no-chain", action="store_true", help="throughput only, no gas table")
    args = parser.parse_args()

    print(f"receipts, one process, CPU time (time.process_time), {args.receipts} receipts")
    header = (
        f"{'operation':<36} | {'receipts':>8} | {'CPU s':>7} | {'per s per core':>14} | "
        f"{'target':>7} | met"
    )
    print(header)
    print("-" * len(header))
    for name, n, seconds, target in throughput(args.receipts):
        rate = n / seconds if seconds > 0 else float("inf")
        met = "-" if target is None else ("yes" if rate >= target else "no")
        shown = "-" if target is None else f">= {target}"
        print(f"{name:<36} | {n:>8} | {seconds:>7.3f} | {rate:>14,.0f} | {shown:>7} | {met}")
    print()
    if args.no_chain:
        return
    print("settlement gas (eth-tester / py-evm, gasUsed of the transaction receipt)")
    header = (
        f"{'receipts/voucher':>16} | {'settlement':<18} | {'gas used':>9} | {'gas/receipt':>11} | "
        f"{'target':>7} | met"
    )
    print(header)
    print("-" * len(header))
    for n, which, used, target in gas(args.sizes):
        per = used / n
        met = "-" if target is None else ("yes" if per <= target else "no")
        shown = "-" if target is None else f"<= {target}"
        print(f"{n:>16,} | {which:<18} | {used:>9,} | {per:>11,.1f} | {shown:>7} | {met}")
    print(
        "(a provider's first settlement also writes storage from zero that later ones only\n"
        " update: its reputation record, its token balance if it had none, and on a fresh\n"
        " deployment the fee recipient's balance; a job's first writes the job's paid, nonce\n"
        " and root slots of the provider)"
    )


if __name__ == "__main__":
    main()
