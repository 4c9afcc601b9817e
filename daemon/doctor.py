"""`gridmesh doctor`: what is wrong with this node, one line per check, each with its fix.

The checks are small functions that turn what was observed into a `Check` (pass, fail or
warn, what was found, what to do). They do no I/O of their own except `local_checks`, which
reads the home's files: the daemon's side (`daemon.doctor_methods`, the `node_doctor` RPC
method) gathers what only a running node knows (peers, the DHT, the chain, GPUs) and hands it
to the verdicts here; the CLI (`daemon.cli.doctor`) adds the local lines and prints them.

A `warn` line does not fail the run: it says something that is not known yet (reachability
until AutoNAT tells), or that is fine for some nodes and not others (no GPU, no chain).

Stdlib and msgspec only: the CLI imports this.
"""

from __future__ import annotations

import math
import os
import stat
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

PASS: Literal["pass"] = "pass"
FAIL: Literal["fail"] = "fail"
WARN: Literal["warn"] = "warn"
SKIP: Literal["skip"] = "skip"  # not checked: a line it depends on failed (that one says why)
Status = Literal["pass", "fail", "warn", "skip"]

Text = Annotated[str, msgspec.Meta(max_length=4000)]

# every line, in the order shown; the first two are read from the home's files, the others
# are asked of the running daemon
LOCAL_CHECKS = ("keys", "config")
DAEMON_CHECKS = (
    "listen",
    "reachability",
    "bootstrap",
    "clock",
    "dht",
    "chain",
    "payout",
    "contracts",
    "gpus",
)
TITLES = {
    "keys": "key files",
    "config": "config",
    "listen": "listen addresses",
    "reachability": "reachability",
    "bootstrap": "bootstrap peers",
    "clock": "clock offset",
    "dht": "DHT round trip",
    "chain": "chain RPC",
    "payout": "payout balance and stake",
    "contracts": "contracts",
    "gpus": "GPUs",
}
Name = Literal[
    "keys",
    "config",
    "listen",
    "reachability",
    "bootstrap",
    "clock",
    "dht",
    "chain",
    "payout",
    "contracts",
    "gpus",
]

# files only the node's user may read: whoever reads one controls the node or its money
SECRET_FILES = ("node.key", "payout.key", "identity.json", "rpc.cookie")


class Check(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One line of the report: what was checked, how it went, what was found, the fix."""

    name: Name
    status: Status
    detail: Text
    fix: Text = ""

    @property
    def title(self) -> str:
        return TITLES[self.name]

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def passed(name: Name, detail: str) -> Check:
    return Check(name, PASS, _cut(detail))


def failed(name: Name, detail: str, fix: str) -> Check:
    return Check(name, FAIL, _cut(detail), _cut(fix))


def warned(name: Name, detail: str, fix: str = "") -> Check:
    return Check(name, WARN, _cut(detail), _cut(fix))


def skipped(name: Name, detail: str, fix: str = "") -> Check:
    return Check(name, SKIP, _cut(detail), _cut(fix))


def _cut(text: str, most: int = 4000) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def parse_checks(raw: Any) -> list[Check]:
    """The daemon's `node_doctor` answer as checks; ValueError when it is not one."""
    try:
        checks = msgspec.convert(raw, list[Check])
    except msgspec.ValidationError as exc:
        raise ValueError(f"node_doctor answered something else: {exc}") from None
    if len(checks) > 64:
        raise ValueError("node_doctor answered too many checks")
    return checks


# -- local: the home's files ------------------------------------------------------------------


@dataclass(frozen=True)
class FileState:
    """What a check needs of one file: its path, permission bits and owner (None: absent)."""

    path: Path
    mode: int | None
    uid: int | None = None


def file_state(path: Path) -> FileState:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return FileState(path, None)
    return FileState(path, stat.S_IMODE(info.st_mode), info.st_uid)


def keys_verdict(
    home: FileState,
    files: Sequence[FileState],
    *,
    uid: int,
    cookie_expected: bool,
    identity_error: str = "",
) -> Check:
    """The node key, payout key, identity binding and RPC cookie: present (the cookie while
    a daemon runs), owned by this user, readable by no one else; the home writable by no one
    else (who can write it can swap the keys)."""
    problems: list[str] = []
    fixes: list[str] = []
    if home.mode is None:
        return failed("keys", f"no home directory {home.path}", "run `gridmesh init`")
    if home.mode & 0o022:
        problems.append(f"{home.path} is writable by others (mode {home.mode:o})")
        fixes.append(f"chmod 700 {home.path}")
    exposed: list[str] = []
    for state in files:
        if state.mode is None:
            if state.path.name == "rpc.cookie" and not cookie_expected:
                continue
            if state.path.name == "identity.json":
                continue  # older homes have none; the keys are what matter
            problems.append(f"{state.path} is missing")
            fixes.append(
                "start the daemon (it writes the cookie)"
                if state.path.name == "rpc.cookie"
                else "run `gridmesh init` (it never overwrites existing keys)"
            )
            continue
        if state.uid is not None and state.uid != uid:
            problems.append(f"{state.path} belongs to uid {state.uid}, not this user ({uid})")
            fixes.append(f"chown {uid} {state.path} (or run doctor as the node's user)")
        if state.mode & 0o077:
            problems.append(f"{state.path} can be read by others (mode {state.mode:o})")
            exposed.append(str(state.path))
    if exposed:
        fixes.append(f"chmod 600 {' '.join(exposed)}")
    if identity_error:
        problems.append(identity_error)
        fixes.append(
            "restore the home's key files from a backup, or move them away and run "
            "`gridmesh init` for a new identity"
        )
    if problems:
        return failed("keys", "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    shown = ", ".join(s.path.name for s in files if s.mode is not None)
    return passed("keys", f"{shown} in {home.path}: owner-only")


def config_verdict(path: Path | None, error: str) -> Check:
    if error:
        return failed("config", error, f"edit {path or 'the config'} (see configs/node.toml)")
    if path is None:
        return passed("config", "no config file: the defaults")
    return passed("config", f"{path} parses and is valid")


def local_checks(
    home: Path, config_path: Path | None, env: Mapping[str, str], *, daemon_running: bool
) -> tuple[list[Check], Any]:
    """The lines read from files: key files and config; and the config (None if invalid)."""
    from daemon import settings

    files = [file_state(home / name) for name in SECRET_FILES]
    identity_error = ""
    if all(s.mode is not None for s in files[:2]):
        from p2p.identity import IdentityError, load_identity

        try:
            load_identity(home)
        except (IdentityError, OSError) as exc:
            identity_error = str(exc)
    keys = keys_verdict(
        file_state(home),
        files,
        uid=os.getuid(),
        cookie_expected=daemon_running,
        identity_error=identity_error,
    )
    config, error = None, ""
    try:
        config = settings.resolve(config_path, env=env)
    except settings.ConfigError as exc:
        error = str(exc)
    return [keys, config_verdict(config_path, error)], config


# -- what the daemon observes -----------------------------------------------------------------


def listen_verdict(addrs: Sequence[str]) -> Check:
    if not addrs:
        return failed(
            "listen",
            "the node listens on no address",
            "set [p2p] listen in config.toml, e.g. /ip4/0.0.0.0/tcp/4001",
        )
    local = ("/ip4/127.", "/ip6/::1/")
    if all(a.startswith(local) for a in addrs):
        return warned(
            "listen",
            f"only loopback: {', '.join(addrs)}",
            "other machines cannot dial loopback: listen on /ip4/0.0.0.0/tcp/4001 to join others",
        )
    return passed("listen", ", ".join(addrs))


def reachability_verdict(reachability: str | None, observed: Sequence[str] = ()) -> Check:
    """`reachability`: what the node reports (public, private), None while it cannot tell
    (no AutoNAT yet)."""
    seen = f"; observed {', '.join(observed)}" if observed else ""
    if reachability == "public":
        return passed("reachability", f"public: other nodes can dial this one{seen}")
    if reachability == "private":
        return warned(
            "reachability",
            f"private: behind NAT or a firewall, reached through relays{seen}",
            "forward the listen port on your router (or enable UPnP) for direct connections",
        )
    return warned(
        "reachability",
        f"unknown: this node cannot tell yet whether others can dial it{seen}",
        "make sure the listen port is open to the internet (router port forwarding, firewall)",
    )


@dataclass(frozen=True)
class BootstrapResult:
    addr: str
    ok: bool
    error: str = ""


def bootstrap_verdict(results: Sequence[BootstrapResult]) -> Check:
    if not results:
        return warned(
            "bootstrap",
            "no bootstrap peers configured: this node only meets peers that dial it",
            "add [p2p] bootstrap (or --bootstrap ADDR) unless this is the network's first node",
        )
    bad = [r for r in results if not r.ok]
    good = len(results) - len(bad)
    if not bad:
        return passed("bootstrap", f"all {good} reachable")
    listed = "; ".join(f"{r.addr}: {r.error or 'unreachable'}" for r in bad)
    if good:
        return passed("bootstrap", f"{good} of {len(results)} reachable; not: {listed}")
    return failed(
        "bootstrap",
        f"none of {len(results)} reachable: {listed}",
        "check the machine's internet connection and firewall (outgoing TCP), and that "
        "[p2p] bootstrap lists current addresses (/ip4/.../tcp/PORT/p2p/PEER_ID)",
    )


@dataclass(frozen=True)
class ClockSample:
    """One peer's wall clock minus ours at the middle of the round trip, and half the round
    trip (the most the estimate can be off by)."""

    peer_id: str
    offset_s: float
    error_s: float


def clock_offset(sent: float, peer_time: float, received: float) -> tuple[float, float]:
    """(offset, error) of a peer's clock from one exchange (as NTP, in one direction)."""
    return peer_time - (sent + received) / 2, max(0.0, received - sent) / 2


def clock_verdict(samples: Sequence[ClockSample], max_skew_s: float, asked: int) -> Check:
    """Pass when the median offset is within half the skew records tolerate
    ([resources] max_clock_skew_s): beyond it, this node's records are refused as issued in
    the future or expired, and it refuses theirs."""
    if not samples:
        if asked:
            why = f"none of the {asked} peers asked answered"
        else:
            why = "no connected peers to compare with"
        return warned("clock", f"not measured: {why}", "see the bootstrap line")
    offset = statistics.median(s.offset_s for s in samples)
    error = statistics.median(s.error_s for s in samples)
    measured = (
        f"{offset:+.3f} s from the median of {len(samples)} peers (± {error:.3f} s, "
        "their clocks as they answered /gridmesh/doctor time)"
    )
    limit = max_skew_s / 2
    if math.isfinite(offset) and abs(offset) - error <= limit:
        return passed("clock", measured)
    side = "behind" if offset > 0 else "ahead of"
    return failed(
        "clock",
        f"this clock is {abs(offset):.1f} s {side} its peers' ({measured}); records are "
        f"refused beyond {max_skew_s:g} s",
        "synchronise the clock: `timedatectl set-ntp true` (systemd-timesyncd) or run chrony",
    )


def dht_verdict(
    *, put_ok: bool, put_error: str, peers: int, found_by: Sequence[str], asked: int
) -> Check:
    """Our record put into the DHT, then asked back by peers (a round trip through others'
    stores, not just this node's)."""
    if peers == 0:
        return failed(
            "dht",
            "no connected peers: the DHT holds nothing beyond this node",
            "fix the bootstrap line first",
        )
    if not put_ok:
        return failed(
            "dht",
            f"putting this node's record failed: {put_error or 'timed out'}",
            "check the connections to peers (bootstrap line); raise [p2p] dht_timeout_s on a "
            "slow link",
        )
    if found_by:
        return passed(
            "dht", f"this node's record put and read back by {len(found_by)} of {asked} peers"
        )
    return failed(
        "dht",
        f"this node's record was put, but none of the {asked} peers asked read it back",
        "peers may be of another network or version (`gridmesh peers`); check [network_id] "
        "and the bootstrap line",
    )


def chain_verdict(
    *,
    network: str,
    url: str,
    chain_id: int | None,
    error: str,
    expected: int | None,
    recorded: int | None,
) -> Check:
    """The chain RPC endpoint answers with the chain id the network and the deployment
    record say."""
    if error:
        return failed(
            "chain",
            f"{url} does not answer: {error}",
            "start the chain or fix [chain] rpc_url in config.toml (for a devnet: `gridmesh "
            "chain serve`)",
        )
    wrong = [
        f"{what} {want}"
        for what, want in (("the network", expected), ("the deployment record", recorded))
        if want is not None and want != chain_id
    ]
    if wrong:
        return failed(
            "chain",
            f"{url} is chain id {chain_id}, but {' and '.join(wrong)} says otherwise",
            f"point [chain] rpc_url at a {network} endpoint, or redeploy: `gridmesh chain "
            f"deploy --network {network} --force`",
        )
    return passed("chain", f"{network} at {url}: chain id {chain_id}")


def no_chain_verdicts(network: str, home: Path, why: str) -> list[Check]:
    """The chain lines of a node without an escrow: unpaid work only (warn), or a recorded
    deployment it cannot use (fail)."""
    if why:
        fix = "fix [chain] in config.toml (rpc_url), then restart the daemon"
        return [
            failed("chain", f"a deployment is recorded but unusable: {why}", fix),
            skipped("payout", "not checked: the chain is not usable", "fix the chain line first"),
            skipped("contracts", "not checked: the chain is not usable", "fix the chain line"),
        ]
    record = home / "chain" / f"{network}.json"
    detail = f"no deployment of [chain] network {network!r} recorded in {record}: unpaid work"
    fix = (
        "`gridmesh chain use --escrow ADDRESS` (a published deployment's JobEscrow), or "
        f"`gridmesh chain deploy --network {network}`"
    )
    return [
        warned("chain", detail, fix),
        warned("payout", "not checked: no chain"),
        warned("contracts", "not checked: no chain"),
    ]


def chain_unreachable_verdicts() -> list[Check]:
    why = "not checked: the chain RPC does not answer"
    return [
        skipped("payout", why, "fix the chain line first"),
        skipped("contracts", why, "fix the chain line first"),
    ]


def payout_verdict(
    *,
    address: str,
    gas_wei: int,
    balance: int,
    stake: int,
    min_stake: int,
    registered: bool,
    active: bool,
    slashed: bool,
) -> Check:
    found = (
        f"{address}: {balance / 1e6:g} tUSD, {gas_wei / 1e18:g} ETH for gas, stake "
        f"{stake / 1e6:g} tUSD (minimum {min_stake / 1e6:g})"
    )
    problems, fixes = [], []
    if gas_wei == 0:
        problems.append("no ETH for gas: settling earnings needs some")
        fixes.append(f"send ETH to {address} (a testnet faucet; on a devnet `gridmesh fund`)")
    if slashed:
        problems.append("the stake was slashed")
        fixes.append("a slashed provider is not paid again: use a new identity")
    elif not registered:
        problems.append("not registered as a provider")
        fixes.append(f"`gridmesh stake {max(min_stake, 1) / 1e6:g}` registers and stakes")
    elif not active:
        problems.append("stake below the minimum: not paid for work")
        short = max(min_stake - stake, 1)
        fixes.append(f"`gridmesh stake {short / 1e6:g}` (tUSD)")
    if problems:
        return failed("payout", f"{'; '.join(problems)} ({found})", "; ".join(fixes))
    return passed("payout", found)


def contracts_verdict(codes: Mapping[str, tuple[str, int]], error: str = "") -> Check:
    """`codes`: contract name -> (its recorded address, the size of the code there)."""
    if error:
        return failed("contracts", f"not read: {error}", "fix the chain line first")
    missing = [f"{name} at {address}" for name, (address, size) in codes.items() if size == 0]
    if missing:
        return failed(
            "contracts",
            f"no code at {', '.join(missing)} (a restarted dev chain, or the wrong chain?)",
            "redeploy: `gridmesh chain deploy --force` (or fix [chain] rpc_url)",
        )
    return passed("contracts", f"all {len(codes)} found: " + ", ".join(codes))


def gpus_verdict(resources: Mapping[str, Any]) -> Check:
    gpus = resources.get("gpus") if isinstance(resources.get("gpus"), list) else []
    error = resources.get("gpu_error")
    if error:
        return failed(
            "gpus",
            f"{len(gpus or [])} detected; NVML said: {error}",
            "check the NVIDIA driver (`nvidia-smi` should list every GPU)",
        )
    if not gpus:
        return warned(
            "gpus",
            "none detected: this node serves on CPU only",
            "if it has an NVIDIA GPU, install its driver (`nvidia-smi` should list it)",
        )
    names = [str(g.get("name", "?")) for g in gpus if isinstance(g, Mapping)]
    driver = resources.get("gpu_driver")
    return passed(
        "gpus", f"{len(names)}: {', '.join(names)}" + (f" (driver {driver})" if driver else "")
    )


def daemon_down(reason: str, home: Path) -> list[Check]:
    """Every daemon line, failed: there is no daemon to ask."""
    fix = f"start the daemon: `gridmesh daemon --home {home}`"
    return [failed(name, f"not checked: {reason}", fix) for name in DAEMON_CHECKS]


# -- the report -------------------------------------------------------------------------------


def ok(checks: Iterable[Check]) -> bool:
    return all(check.status != FAIL for check in checks)


MARKS = {PASS: "ok  ", FAIL: "FAIL", WARN: "warn", SKIP: "skip"}


def render(checks: Sequence[Check]) -> str:
    """One line per check, its fix on the next when it has one (once after a run of lines
    with the same fix: every daemon line without a daemon)."""
    width = max((len(c.title) for c in checks), default=0)
    lines = []
    for index, check in enumerate(checks):
        lines.append(f"{MARKS[check.status]}  {check.title:<{width}}  {check.detail}")
        after = checks[index + 1] if index + 1 < len(checks) else None
        same_next = after is not None and after.fix == check.fix and after.status != PASS
        if check.fix and check.status != PASS and not same_next:
            lines.append(f"      {'':<{width}}  fix: {check.fix}")
    failures = sum(c.status == FAIL for c in checks)
    skips = sum(c.status == SKIP for c in checks)
    if failures:
        not_checked = f" ({skips} not checked)" if skips else ""
        lines.append(f"{failures} of {len(checks)} checks failed{not_checked}")
    else:
        warnings = " (with warnings)" if any(c.status == WARN for c in checks) else ""
        lines.append(f"all {len(checks)} checks passed{warnings}")
    return "\n".join(lines)
