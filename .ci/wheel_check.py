"""Build the wheel, install it in a fresh venv outside the checkout, and use it from there.

    .venv/bin/python .ci/wheel_check.py [--keep]      (or: make wheel-check)

Steps, each timed: build the wheel (pip wheel, no dependencies); check that it carries every
tracked file of our packages and configs/ (as daemon/configs); make a fresh venv in a temporary
folder; install the wheel with the `shards` extra and all its dependencies; then, with the
working directory in that folder, run `gridmesh init`, start `gridmesh daemon`, wait until
`gridmesh status` answers, stop it with SIGTERM, and run `gridmesh model make-tiny`.

torch is not installed twice: torch and what it requires, as installed in the venv running this
script, are linked into a folder that a .pth file puts on the fresh venv's path, so pip counts
them as installed. Everything else the wheel declares is installed by pip (from its cache when
warm), so a dependency missing from pyproject.toml fails here. Without torch in this venv it
installs torch==2.13.0 (the CPU build on this machine's disk), as the Makefile does.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "p2p", "registry", "scheduler", "contracts")
CONFIGS_IN_WHEEL = "daemon/configs"
TORCH_CPU = "torch==2.13.0"


class CheckFailed(Exception):
    pass


def say(message: str) -> None:
    print(f"wheel-check: {message}", flush=True)


def run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    """Run `cmd`; on failure raise CheckFailed with its output."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CheckFailed(
            f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
    return done


def tracked_files() -> list[str]:
    """Files of our packages and configs/ that the checkout tracks (all files if not git)."""
    roots = [*PACKAGES, "configs"]
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *roots],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        return [name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return [
            str(p.relative_to(REPO))
            for root in roots
            for p in (REPO / root).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]


def check_contents(wheel: Path) -> int:
    """Every tracked file is in the wheel, configs/X as daemon/configs/X with the same bytes."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = []
        expected = 0
        for name in tracked_files():
            if not (REPO / name).is_file():
                continue  # deleted in the working tree, not yet committed
            inside = (
                CONFIGS_IN_WHEEL + name[len("configs") :] if name.startswith("configs/") else name
            )
            expected += 1
            if inside not in names:
                missing.append(f"{name} (as {inside})")
            elif name.startswith("configs/") and archive.read(inside) != (REPO / name).read_bytes():
                missing.append(f"{name} (differs in the wheel)")
    if missing:
        raise CheckFailed("the wheel lacks:\n  " + "\n  ".join(missing))
    return expected


def heavy_closure(root: str = "torch") -> list[importlib.metadata.Distribution]:
    """`root` and, transitively, what it requires, as installed here (extras not followed)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement not installed here
        found[name] = dist
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            todo.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    return list(found.values())


def link_heavy(folder: Path) -> list[str]:
    """Symlink torch and its requirements' top-level files into `folder`; their names."""
    folder.mkdir()
    names = []
    for dist in heavy_closure():
        names.append(f"{dist.metadata['Name']}=={dist.version}")
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return names


def wait_for(predicate, deadline_s: float, what: str) -> None:
    """Poll `predicate` until it is true or `deadline_s` passes (then fail naming `what`)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise CheckFailed(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def use_the_wheel(venv: Path, work: Path) -> dict[str, float]:
    """init, daemon start/stop and make-tiny from the installed wheel, cwd outside the repo."""
    timings: dict[str, float] = {}
    bin_dir = venv / "bin"
    gridmesh = str(bin_dir / "gridmesh")
    home = work / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", GRIDMESH_HOME=str(home))

    where = run(
        [str(bin_dir / "python"), "-c", "import daemon, sys; print(daemon.__file__)"],
        cwd=work,
        env=env,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(venv.resolve()):
        raise CheckFailed(f"daemon was imported from {where}, not from the fresh venv")
    if Path(where).resolve().is_relative_to(REPO):
        raise CheckFailed(f"daemon was imported from the checkout ({where})")
    say(f"daemon imports from {where}")

    started = time.monotonic()
    out = run([gridmesh, "init"], cwd=work, env=env, timeout=120).stdout
    written = (home / "config.toml").read_text()
    if written != (REPO / "configs" / "node.toml").read_text():
        raise CheckFailed("gridmesh init wrote a config.toml that is not configs/node.toml")
    timings["gridmesh init"] = time.monotonic() - started
    say("gridmesh init: " + " | ".join(line.strip() for line in out.splitlines()))

    started = time.monotonic()
    log = (work / "daemon.log").open("w")
    proc = subprocess.Popen(
        [gridmesh, "daemon", "--listen", "/ip4/127.0.0.1/tcp/0", "--rpc-port", "0"],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                raise CheckFailed(f"the daemon exited {proc.returncode} before answering")
            status = [gridmesh, "status", "--json"]
            probe = subprocess.run(status, cwd=work, env=env, capture_output=True, timeout=30)
            return probe.returncode == 0

        wait_for(answers, 60, "`gridmesh status` to answer")
        timings["daemon start (to status)"] = time.monotonic() - started
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        timings["daemon stop (SIGTERM)"] = time.monotonic() - stopping
        if code != 0:
            raise CheckFailed(f"the daemon exited {code} on SIGTERM")
        if (home / "daemon.json").exists():
            raise CheckFailed("the daemon left daemon.json behind")
        if "Traceback" in (work / "daemon.log").read_text():
            raise CheckFailed("the daemon logged a traceback")
    except CheckFailed as exc:
        log.flush()
        tail = (work / "daemon.log").read_text()[-4000:]
        raise CheckFailed(f"{exc}\n--- the daemon's log (end) ---\n{tail}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    say("gridmesh daemon: started, answered `gridmesh status`, stopped on SIGTERM (exit 0)")

    started = time.monotonic()
    out = run([gridmesh, "model", "make-tiny", str(work / "tiny")], cwd=work, env=env).stdout
    if not (work / "tiny" / "config.json").is_file() or not list(
        (work / "tiny").glob("*.safetensors")
    ):
        raise CheckFailed("gridmesh model make-tiny wrote no config.json / safetensors")
    timings["gridmesh model make-tiny"] = time.monotonic() - started
    say("gridmesh model make-tiny: " + " | ".join(line.strip() for line in out.splitlines()))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gridmesh-wheel-check-")).resolve()
    timings: dict[str, float] = {}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    try:
        if tmp.is_relative_to(REPO):
            raise CheckFailed(f"{tmp} is inside the checkout; set TMPDIR elsewhere")
        say(f"working in {tmp}")
        started = time.monotonic()
        run([*pip, "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp / "dist")], cwd=tmp)
        (wheel,) = (tmp / "dist").glob("gridmesh-*.whl")
        timings["build wheel"] = time.monotonic() - started
        count = check_contents(wheel)
        say(f"built {wheel.name}: it carries all {count} tracked package and config files")

        started = time.monotonic()
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
        target = ["--python", str(venv / "bin" / "python")]
        purelib = run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            cwd=tmp,
        ).stdout.strip()
        if importlib.util.find_spec("torch") is not None:
            linked = link_heavy(tmp / "heavy")
            Path(purelib, "_gridmesh_heavy.pth").write_text(f"{tmp / 'heavy'}\n")
            say(f"linked from {sysconfig.get_path('purelib')}: {', '.join(sorted(linked))}")
        else:
            say(f"no torch here: installing {TORCH_CPU}")
            run([*pip, *target, "install", "-q", TORCH_CPU], cwd=tmp)
        timings["fresh venv (+ links)"] = time.monotonic() - started

        started = time.monotonic()
        run([*pip, *target, "install", "-q", f"{wheel}[shards]"], cwd=tmp)
        run([*pip, *target, "check"], cwd=tmp)
        timings["pip install wheel[shards] + pip check"] = time.monotonic() - started
        listed = run([*pip, *target, "list", "--format=freeze"], cwd=tmp).stdout.splitlines()
        if any(line.lower().startswith("pynvml==") for line in listed):
            raise CheckFailed("the deprecated pynvml shim got installed (use nvidia-ml-py)")
        say(f"installed with its dependencies ({len(listed)} distributions visible), pip check ok")

        work = tmp / "work"
        work.mkdir()
        timings.update(use_the_wheel(venv, work))
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            started = time.monotonic()
            shutil.rmtree(tmp, ignore_errors=True)
            timings["clean up"] = time.monotonic() - started
    width = max(map(len, timings))
    for step, seconds in timings.items():
        print(f"  {step:<{width}}  {seconds:6.1f} s")
    print(f"  {'total':<{width}}  {sum(timings.values()):6.1f} s")
    say("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
