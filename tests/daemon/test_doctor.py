"""`gridmesh doctor`'s verdicts (daemon.doctor, no I/O), its local lines on real files, the
doctor protocol's refusals, and the command without a daemon: every daemon line fails with
"start the daemon", --json carries the same lines, the exit status is 1."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from daemon import doctor
from daemon.cli.main import app
from daemon.doctor import BootstrapResult, ClockSample, FileState
from daemon.doctor_methods import Ask, decode_answer, decode_ask
from p2p.identity import init_identity

UID = 1000


def _files(home: Path, mode: int = 0o600, **modes: int) -> list[FileState]:
    return [
        FileState(home / name, modes.get(name.replace(".", "_"), mode), UID)
        for name in doctor.SECRET_FILES
    ]


def test_keys_pass_when_owner_only() -> None:
    home = Path("/h")
    check = doctor.keys_verdict(
        FileState(home, 0o700, UID), _files(home), uid=UID, cookie_expected=True
    )
    assert check.status == "pass", check
    assert "node.key" in check.detail and "rpc.cookie" in check.detail


@pytest.mark.parametrize("name", doctor.SECRET_FILES)
def test_a_key_file_readable_by_others_fails_with_chmod(name: str) -> None:
    home = Path("/h")
    modes = {name.replace(".", "_"): 0o644}
    check = doctor.keys_verdict(
        FileState(home, 0o700, UID), _files(home, **modes), uid=UID, cookie_expected=True
    )
    assert check.status == "fail"
    assert f"/h/{name} can be read by others (mode 644)" in check.detail
    assert check.fix == f"chmod 600 /h/{name}"


def test_keys_missing_home_other_owner_and_writable_home() -> None:
    home = Path("/h")
    none = doctor.keys_verdict(FileState(home, None), [], uid=UID, cookie_expected=False)
    assert none.status == "fail" and "gridmesh init" in none.fix
    files = _files(home)
    files[0] = FileState(home / "node.key", 0o600, 0)
    check = doctor.keys_verdict(FileState(home, 0o777, UID), files, uid=UID, cookie_expected=True)
    assert check.status == "fail"
    assert "writable by others" in check.detail and "chmod 700 /h" in check.fix
    assert "belongs to uid 0" in check.detail and "chown 1000 /h/node.key" in check.fix


def test_cookie_is_needed_only_while_a_daemon_runs() -> None:
    home = Path("/h")
    files = [*_files(home)[:3], FileState(home / "rpc.cookie", None)]
    down = doctor.keys_verdict(FileState(home, 0o700, UID), files, uid=UID, cookie_expected=False)
    assert down.status == "pass"
    up = doctor.keys_verdict(FileState(home, 0o700, UID), files, uid=UID, cookie_expected=True)
    assert up.status == "fail" and "rpc.cookie is missing" in up.detail
    missing_key = [FileState(home / "node.key", None), *files[1:]]
    check = doctor.keys_verdict(
        FileState(home, 0o700, UID), missing_key, uid=UID, cookie_expected=False
    )
    assert check.status == "fail" and "node.key is missing" in check.detail
    assert "gridmesh init" in check.fix


def test_local_checks_read_real_files(tmp_path: Path) -> None:
    home = tmp_path / "node"
    init_identity(home)
    lines, config = doctor.local_checks(home, None, {}, daemon_running=False)
    assert [c.status for c in lines] == ["pass", "pass"], lines
    assert config is not None
    (home / "payout.key").chmod(0o644)
    bad_config = home / "config.toml"
    bad_config.write_text("[p2p]\nreconnect_min_s = -1\n")
    lines, config = doctor.local_checks(home, bad_config, {}, daemon_running=False)
    keys, conf = lines
    assert keys.status == "fail" and keys.fix == f"chmod 600 {home / 'payout.key'}"
    assert conf.status == "fail" and "reconnect_min_s" in conf.detail and config is None
    env_error, _ = doctor.local_checks(
        home, None, {"GRIDMESH_RPC__PORT": "x"}, daemon_running=False
    )
    assert env_error[1].status == "fail" and "GRIDMESH_RPC__PORT" in env_error[1].detail


def test_a_damaged_key_fails_the_keys_line(tmp_path: Path) -> None:
    home = tmp_path / "node"
    init_identity(home)
    (home / "node.key").write_text("not hex\n")
    lines, _ = doctor.local_checks(home, None, {}, daemon_running=False)
    assert lines[0].status == "fail" and "not a hex-encoded key" in lines[0].detail


def test_listen_and_reachability() -> None:
    assert doctor.listen_verdict([]).status == "fail"
    loop = doctor.listen_verdict(["/ip4/127.0.0.1/tcp/1/p2p/x"])
    assert loop.status == "warn" and "0.0.0.0" in loop.fix
    assert doctor.listen_verdict(["/ip4/10.0.0.1/tcp/1/p2p/x"]).status == "pass"
    assert doctor.reachability_verdict(None).status == "warn"
    assert "unknown" in doctor.reachability_verdict(None).detail
    assert doctor.reachability_verdict("public", ["/ip4/1.2.3.4/tcp/1"]).status == "pass"
    assert doctor.reachability_verdict("private").status == "warn"


def test_bootstrap() -> None:
    assert doctor.bootstrap_verdict([]).status == "warn"
    ok, bad = BootstrapResult("/a", True), BootstrapResult("/b", False, "refused")
    assert doctor.bootstrap_verdict([ok]).status == "pass"
    some = doctor.bootstrap_verdict([ok, bad])
    assert some.status == "pass" and "/b: refused" in some.detail
    none = doctor.bootstrap_verdict([bad, bad])
    assert none.status == "fail" and "none of 2 reachable" in none.detail
    assert "firewall" in none.fix


def test_clock_offset_and_verdict() -> None:
    assert doctor.clock_offset(100.0, 110.5, 101.0) == (10.0, 0.5)
    near = [ClockSample("a", 0.2, 0.01), ClockSample("b", -0.1, 0.01), ClockSample("c", 0.0, 0)]
    assert doctor.clock_verdict(near, 10.0, 3).status == "pass"
    # most peers agree this clock is 30 s behind: one honest-looking outlier does not matter
    behind = [ClockSample("a", 30, 0.01), ClockSample("b", 31, 0.01), ClockSample("c", 0, 0)]
    check = doctor.clock_verdict(behind, 10.0, 3)
    assert check.status == "fail" and "30.0 s behind" in check.detail
    assert "timedatectl set-ntp true" in check.fix
    # 6 s off, give or take 1.5 s: it may be within the 5 s allowed (half the skew)
    assert doctor.clock_verdict([ClockSample("a", -6, 1.5)], 10.0, 1).status == "pass"
    assert doctor.clock_verdict([ClockSample("a", -6, 0.1)], 10.0, 1).status == "fail"
    assert doctor.clock_verdict([], 10.0, 0).status == "warn"
    assert "none of the 2 peers" in doctor.clock_verdict([], 10.0, 2).detail


def test_dht() -> None:
    assert doctor.dht_verdict(put_ok=False, put_error="", peers=0, found_by=(), asked=0).fix == (
        "fix the bootstrap line first"
    )
    put_failed = doctor.dht_verdict(put_ok=False, put_error="", peers=2, found_by=(), asked=2)
    assert put_failed.status == "fail" and "timed out" in put_failed.detail
    unread = doctor.dht_verdict(put_ok=True, put_error="", peers=2, found_by=(), asked=2)
    assert unread.status == "fail" and "none of the 2 peers" in unread.detail
    ok = doctor.dht_verdict(put_ok=True, put_error="", peers=3, found_by=("a",), asked=3)
    assert ok.status == "pass" and "1 of 3" in ok.detail


def test_chain_payout_contracts_gpus() -> None:
    down = doctor.chain_verdict(
        network="devnet", url="http://x", chain_id=None, error="refused", expected=1, recorded=1
    )
    assert down.status == "fail" and "gridmesh chain serve" in down.fix
    wrong = doctor.chain_verdict(
        network="base-sepolia", url="http://x", chain_id=1, error="", expected=84532, recorded=1
    )
    assert wrong.status == "fail" and "the network 84532" in wrong.detail
    assert (
        doctor.chain_verdict(
            network="anvil", url="http://x", chain_id=5, error="", expected=5, recorded=5
        ).status
        == "pass"
    )
    unpaid = doctor.no_chain_verdicts("devnet", Path("/h"), "")
    assert [c.status for c in unpaid] == ["warn"] * 3
    broken = doctor.no_chain_verdicts("base-sepolia", Path("/h"), "no default RPC endpoint")
    assert [c.status for c in broken] == ["fail", "skip", "skip"]  # chain fails; the rest wait
    report = doctor.render(broken)
    assert "1 of 3 checks failed (2 not checked)" in report and "skip" in report
    payout = dict(
        address="0xA", gas_wei=10**18, balance=5 * 10**6, stake=100 * 10**6,
        min_stake=100 * 10**6, registered=True, active=True, slashed=False,
    )  # fmt: skip
    assert doctor.payout_verdict(**payout).status == "pass"
    broke = doctor.payout_verdict(**{**payout, "gas_wei": 0})
    assert broke.status == "fail" and "send ETH to 0xA" in broke.fix
    low = doctor.payout_verdict(**{**payout, "stake": 40 * 10**6, "active": False})
    assert low.status == "fail" and "`gridmesh stake 60`" in low.fix
    unregistered = doctor.payout_verdict(**{**payout, "registered": False, "active": False})
    assert "`gridmesh stake 100` registers" in unregistered.fix
    codes = {"JobEscrow": ("0x1", 100), "TestUSD": ("0x2", 0)}
    missing = doctor.contracts_verdict(codes)
    assert missing.status == "fail" and "TestUSD at 0x2" in missing.detail
    assert doctor.contracts_verdict({"JobEscrow": ("0x1", 9)}).status == "pass"
    assert doctor.gpus_verdict({"gpus": []}).status == "warn"
    assert doctor.gpus_verdict({"gpus": [{"name": "H200"}], "gpu_driver": "560"}).status == "pass"
    assert doctor.gpus_verdict({"gpus": [], "gpu_error": "nvmlInit: boom"}).status == "fail"


def test_report_and_exit_rule() -> None:
    lines = [doctor.passed("config", "fine"), doctor.warned("gpus", "none", "install")]
    assert doctor.ok(lines)
    text = doctor.render(lines)
    assert text.splitlines()[-1] == "all 2 checks passed (with warnings)"
    lines.append(doctor.failed("chain", "down", "start it"))
    assert not doctor.ok(lines)
    text = doctor.render(lines)
    assert "FAIL  chain RPC  down" in text and "fix: start it" in text
    assert text.splitlines()[-1] == "1 of 3 checks failed"


def test_parse_checks_refuses_what_is_not_a_check() -> None:
    good = [doctor.passed("gpus", "1").as_json()]
    assert doctor.parse_checks(good)[0].status == "pass"
    for bad in ([{"name": "gpus", "status": "maybe", "detail": ""}], {"x": 1}, [{"name": "x"}]):
        with pytest.raises(ValueError):
            doctor.parse_checks(bad)


def test_doctor_protocol_messages_are_bounded_and_typed() -> None:
    assert decode_ask(msgspec.msgpack.encode(Ask("time"))).op == "time"
    for bad in (b"", b"\x01", msgspec.msgpack.encode({"op": "rm -rf"}), b"\x80" * 65):
        with pytest.raises(ValueError):
            decode_ask(bad)
    with pytest.raises(ValueError):
        decode_answer(msgspec.msgpack.encode({"time": "noon"}))


def test_cli_without_a_daemon_fails_every_daemon_line(tmp_path: Path) -> None:
    home = tmp_path / "node"
    init_identity(home)
    runner = CliRunner()
    result = runner.invoke(app, ["doctor", "--home", str(home)])
    assert result.exit_code == 1, result.output
    assert "ok    key files" in result.output
    # the same fix once, after the lines it fixes
    assert result.output.count("fix: start the daemon: `gridmesh daemon --home") == 1
    assert result.output.count("not checked: no daemon is running") == len(doctor.DAEMON_CHECKS)
    assert result.output.splitlines()[-2].strip().startswith("fix: start the daemon")
    as_json = runner.invoke(app, ["doctor", "--home", str(home), "--json"])
    assert as_json.exit_code == 1
    report = json.loads(as_json.output)
    assert report["ok"] is False
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {
        "keys": "pass",
        "config": "pass",
        **{name: "fail" for name in doctor.DAEMON_CHECKS},
    }
