"""The README's "Join the testnet" section, command for command (issue 19's testnet rehearsal).

Its two fenced blocks are read out of README.md and run as written: the deployer's (init,
`chain deploy --network base-sepolia`) and the newcomer's (init, `chain use`, fund, daemon,
stake, doctor, model deploy, a paid generation, earnings, unstake, withdraw). Base Sepolia is a
local anvil started with chain id 84532; the bootstrap nodes are two local daemons on the
testnet profile. Substituted, and nothing else: the RPC URL, the bootstrap address (by every
local one), the published JobEscrow address (the one the first block deployed), the homes
(GRIDMESH_HOME), and the newcomer daemon's listen address and RPC port (GRIDMESH_P2P__LISTEN,
GRIDMESH_RPC__PORT: several daemons share this machine). The faucet is anvil_setBalance, the
unbonding week evm_increaseTime. `gridmesh daemon` runs as a process, every other command in
this process through the CLI's own typer app (the same code, without a Python start each).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from daemon import config as configuration
from daemon.api.client import RPCClient
from daemon.api.cookie import read_cookie
from daemon.cli.main import app
from daemon.devnet import DaemonProcess, DevnetError, wait_for
from daemon.home import DAEMON_FILE

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Join the testnet"
RPC_URL = "https://YOUR-BASE-SEPOLIA-ENDPOINT"
BOOTSTRAP = "/dns4/BOOTSTRAP-HOST/tcp/4001/p2p/BOOTSTRAP-PEER-ID"
ESCROW = "0xPUBLISHED-JOBESCROW-ADDRESS"
CHAIN_ID = 84532
TUSD = 10**6
STAKE = 100 * TUSD  # `gridmesh stake 100tUSD` in the README

runner = CliRunner()


@dataclass(frozen=True)
class Step:
    """One command line of a block: its words, and the shell variable it assigns, if any."""

    line: str
    argv: list[str]
    assigns: str | None = None


def readme_blocks() -> list[list[Step]]:
    """The command lines of each fenced block in the README's "Join the testnet" section."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]  # the insides of the fences
    return [[_step(line) for line in block.splitlines() if _command(line)] for block in blocks]


def _command(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def _step(line: str) -> Step:
    assign = re.fullmatch(r"\s*([A-Z_]+)=\$\((.*)\)\s*(#.*)?", line)
    if assign:
        return Step(line, shlex.split(assign.group(2), comments=True), assign.group(1))
    return Step(line, shlex.split(line, comments=True))


def substitute(argv: list[str], values: dict[str, str], bootstrap: list[str]) -> list[str]:
    """`argv` with the placeholders and $VARIABLES replaced; `--bootstrap PLACEHOLDER` becomes
    one --bootstrap per local bootstrap node."""
    out: list[str] = []
    for word in argv:
        if word == BOOTSTRAP:
            assert out and out[-1] == "--bootstrap", argv
            out.pop()
            out.extend(arg for addr in bootstrap for arg in ("--bootstrap", addr))
            continue
        for name, value in values.items():
            word = word.replace(name, value)
        out.append(word)
    return out


def _click_command(argv: list[str]) -> tuple[Any, list[str]]:
    """The click command `gridmesh ARGV` runs, and the arguments left for it."""
    import typer.main

    command: Any = typer.main.get_command(app)
    words = list(argv[1:])
    while hasattr(command, "get_command") and words and not words[0].startswith("-"):
        found = command.get_command(None, words[0])
        assert found is not None, f"`{' '.join(argv)}`: no command {words[0]!r}"
        command, words = found, words[1:]
    return command, words


def test_the_readme_blocks_are_gridmesh_commands_that_parse() -> None:
    """Without any process: both blocks are there and every gridmesh line parses with the real
    CLI (a renamed command or option fails here, before the rehearsal)."""
    deployer, newcomer = readme_blocks()
    names = [s.argv[1] for s in newcomer if s.argv[0] == "gridmesh"]
    assert names == [
        "init",
        "chain",
        "fund",
        "daemon",
        "stake",
        "doctor",
        "model",
        "deploy",
        "job",
        "generate",
        "earnings",
        "unstake",
        "withdraw",
    ]
    assert [s.argv[:3] for s in deployer] == [
        ["gridmesh", "init", "--network"],
        ["gridmesh", "chain", "deploy"],
    ]
    values = {RPC_URL: "http://127.0.0.1:8545", ESCROW: "0x" + "11" * 20, "$JOB": "0x" + "22" * 32}
    for step in [*deployer, *newcomer]:
        if step.argv[0] == "pip":
            assert step.argv[1] == "install", step.line  # the only lines not run
            continue
        assert step.argv[0] == "gridmesh", step.line
        argv = substitute(step.argv, values, ["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWx"])
        command, words = _click_command(argv)
        command.make_context(argv[1], words)  # click.UsageError for a wrong option or argument


# -- the rehearsal ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


def _ended_or_answers(proc: subprocess.Popen[bytes], url: str) -> bool:
    return proc.poll() is not None or _answers(url)


def _answers(url: str) -> bool:
    try:
        return int(_rpc(url, "eth_chainId", []), 16) == CHAIN_ID
    except OSError:
        return False


@contextmanager
def anvil(binary: Path) -> Iterator[str]:
    """anvil as Base Sepolia (chain id 84532) on a free 127.0.0.1 port; its URL. Always
    stopped afterwards."""
    for _attempt in range(3):  # the port may be taken between our check and anvil's bind
        url = f"http://127.0.0.1:{_free_port()}"
        try:
            proc = subprocess.Popen(
                [str(binary), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
                + ["--chain-id", str(CHAIN_ID), "--silent"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:  # not executable here (another platform's binary, noexec, ...)
            print(f"skipped: anvil {binary} cannot run: {exc}")
            pytest.skip(f"anvil {binary} cannot run: {exc}")
        try:
            wait_for(lambda: _ended_or_answers(proc, url), 30, "anvil to answer")  # noqa: B023
            if proc.poll() is None:
                yield url
                return
        finally:
            proc.kill()
            proc.wait()
            assert proc.stderr is not None
            stderr = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
    pytest.fail(f"anvil did not start: {stderr[-2000:]}")


def _cli(argv: list[str], env: dict[str, str]) -> Any:
    """`gridmesh ARGV` through the CLI's app in this process; its click Result (`stdout`, and
    `output` with stderr too), exit 0 asserted."""
    assert argv[0] == "gridmesh", argv
    result = runner.invoke(app, argv[1:], env=env)
    assert result.exit_code == 0, (
        f"`{shlex.join(argv)}` exited {result.exit_code}:\n{result.output}"
    )
    return result


def _until_earned(argv: list[str], env: dict[str, str], timeout_s: float = 30) -> Any:
    """`gridmesh earnings` run again until it shows the job settled with nothing pending."""

    def settled() -> Any:
        result = _cli(argv, env)
        return result if _earned(result.output) else None

    return wait_for(settled, timeout_s, "the earnings to be settled", poll_s=0.3)


def _serves(boot: DaemonProcess, peer_id: str) -> bool:
    """Whether `boot` sees `peer_id` announce a block of the model tiny."""
    return peer_id in json.dumps(boot.call("block_list", {"model": "tiny"})["announced"])


def _start_daemon(argv: list[str], env: dict[str, str], home: Path, stack: ExitStack) -> dict:
    """`gridmesh ARGV` (the daemon) as a process of its own, stopped when `stack` closes; its
    daemon.json once it is up."""
    log = open(home / "daemon.log", "ab")  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli.main", *argv[1:]],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**_environ(), **env, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    stack.callback(_stop, proc)

    def up() -> dict | None:
        if proc.poll() is not None:
            raise DevnetError(f"`{shlex.join(argv)}` exited {proc.returncode}:\n{_tail(home)}")
        try:
            return json.loads((home / DAEMON_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    return wait_for(up, 30, "the newcomer's daemon to start")


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("GRIDMESH_")}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(home: Path, lines: int = 40) -> str:
    try:
        return "\n".join((home / "daemon.log").read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class Chain:
    """Direct reads of the contracts (not through gridmesh), and anvil's testing methods."""

    def __init__(self, url: str, escrow: str) -> None:
        from web3 import Web3

        from contracts import artifacts

        self.url = url
        self.w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 10}))
        self.escrow = job_escrow = self.w3.eth.contract(escrow, abi=artifacts.load("JobEscrow").abi)
        self.token = self.w3.eth.contract(
            job_escrow.functions.token().call(), abi=artifacts.load("TestUSD").abi
        )
        self.providers = self.w3.eth.contract(
            job_escrow.functions.providers().call(), abi=artifacts.load("ProviderRegistry").abi
        )

    def tusd(self, address: str) -> int:
        return int(self.token.functions.balanceOf(address).call())

    def paid(self, job: str, provider: str) -> int:
        return int(self.escrow.functions.paid(bytes.fromhex(job[2:]), provider).call())

    def stake(self, address: str) -> int:
        return int(self.providers.functions.stakeOf(address).call())

    def pass_unbonding_delay(self) -> None:
        delay = int(self.providers.functions.unbondingDelay().call())
        _rpc(self.url, "evm_increaseTime", [delay + 1])
        _rpc(self.url, "evm_mine", [])


def faucet(url: str, init_output: str) -> str:
    """Base Sepolia ETH for the payout address `gridmesh init` printed (anvil_setBalance)."""
    found = re.search(r"payout address:\s+(0x[0-9a-fA-F]{40})", init_output)
    assert found, init_output
    _rpc(url, "anvil_setBalance", [found.group(1), hex(10**18)])
    return found.group(1)


def _earned(output: str) -> int | None:
    """The settled amount of the one job in `gridmesh earnings`, once nothing is pending."""
    found = re.search(r"settled ([0-9.]+) tUSD, pending 0 tUSD", output)
    return int(float(found.group(1)) * TUSD) if found else None


@pytest.mark.procs
def test_the_readme_join_the_testnet_section_runs_on_a_local_testnet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")  # `gridmesh model make-tiny` and serving
    from tests.contracts.conftest import NOT_INSTALLED, anvil_binary

    binary = anvil_binary()
    if binary is None:
        print(f"skipped: anvil: {NOT_INSTALLED}")
        pytest.skip(f"anvil: {NOT_INSTALLED}")
    deployer_block, newcomer_block = readme_blocks()
    root = tmp_path / "testnet"
    root.mkdir()
    monkeypatch.chdir(root)  # ./tiny
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)  # last: after every process
        url = stack.enter_context(anvil(binary))
        try:
            _rehearse(url, root, deployer_block, newcomer_block, stack)
        except BaseException:
            for home in sorted(root.glob("*/daemon.log")):
                print(f"--- {home.parent.name}'s daemon log ---\n{_tail(home.parent)}")
            raise


def _rehearse(
    url: str,
    root: Path,
    deployer_block: list[Step],
    newcomer_block: list[Step],
    stack: ExitStack,
) -> None:
    """Both README blocks against anvil at `url`, homes under `root`; processes are stopped by
    `stack`."""
    from contracts.chain.records import read_record

    values = {RPC_URL: url}

    # the deployer's block
    deployer = {"GRIDMESH_HOME": str(root / "deployer")}
    for step in deployer_block:
        output = _cli(substitute(step.argv, values, []), deployer).output
        if step.argv[1] == "init":
            faucet(url, output)
    published = re.search(r"^JobEscrow\s+(0x[0-9a-fA-F]{40})$", output, re.MULTILINE)
    assert published, output
    record = read_record(root / "deployer", "base-sepolia")
    assert record is not None and record.chain_id == CHAIN_ID
    assert record.addresses["JobEscrow"] == published.group(1)
    values[ESCROW] = published.group(1)
    chain = Chain(url, published.group(1))

    # the bootstrap nodes: the testnet profile, on loopback
    boots: list[DaemonProcess] = []
    for index in range(2):
        boot = DaemonProcess(
            root / f"boot{index}",
            config=configuration.REPO_CONFIGS / "testnet.toml",
            bootstrap=[boots[-1].addr] if boots else [],
        )
        stack.callback(boot.stop)
        boots.append(boot.start())

    # the newcomer's block
    home = root / "newcomer"
    env = {
        "GRIDMESH_HOME": str(home),
        "GRIDMESH_P2P__LISTEN": "/ip4/127.0.0.1/tcp/0",
        "GRIDMESH_RPC__PORT": "0",
    }
    addrs = [boot.addr for boot in boots]
    payout = info = None
    acknowledged = 0
    for step in newcomer_block:
        if step.argv[0] == "pip":
            continue  # installed: this is the checkout's venv
        argv = substitute(step.argv, values, addrs)
        command = argv[1]
        if command == "daemon":
            info = _start_daemon(argv, env, home, stack)
            node = RPCClient(info["rpc_url"], read_cookie(home)).call("node_info")
            assert node["network_id"] == "gridmesh-testnet", node
            continue
        if command == "withdraw":
            before = chain.tusd(payout)
            chain.pass_unbonding_delay()  # "once the unbonding delay is over"
        # earnings: settled when the job's session ends, so it is run until they are
        result = _until_earned(argv, env) if command == "earnings" else _cli(argv, env)
        output = result.output
        print(f"$ {shlex.join(argv)}\n{output}")  # shown when the test fails
        if step.assigns:  # VAR=$(...): its stdout
            values["$" + step.assigns] = result.stdout.strip()
        if command == "init":
            payout = faucet(url, output)
            config = configuration.resolve(home / "config.toml", env={}, flags={})
            assert (config.network, config.network_id) == ("testnet", "gridmesh-testnet")
            assert config.chain.network == "base-sepolia" and config.chain.rpc_url == url
        elif command == "stake":
            assert chain.stake(payout) == STAKE
            assert chain.providers.functions.isActive(payout).call()
        elif command == "deploy":  # the network sees this node serve the model
            peer_id = info["peer_id"]
            wait_for(lambda: _serves(boots[0], peer_id), 20, "tiny served, seen by boot0")  # noqa: B023
        elif command == "generate":
            tokens = re.search(r"\((\d+) tokens in ", output)  # 16 unless the model ends
            assert tokens and 0 < int(tokens.group(1)) <= 16, output
            paid = re.search(r"\(paid job (0x[0-9a-f]{64}): (\d+) acknowledged", output)
            assert paid and paid.group(1) == values["$JOB"] and int(paid.group(2)) > 0, output
            acknowledged = int(paid.group(2))
        elif command == "earnings":  # what the generation acknowledged, settled on chain
            assert _earned(output) == acknowledged, output
            assert chain.paid(values["$JOB"], payout) == acknowledged
        elif command == "unstake":
            assert chain.stake(payout) == 0
        elif command == "withdraw":
            assert chain.tusd(payout) == before + STAKE, output
    assert info is not None and payout is not None and acknowledged > 0
