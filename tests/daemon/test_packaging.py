"""Packaging: where the profiles are found, what the wheel must carry (.ci/wheel_check.py's
checks, on hand-made wheels; `make wheel-check` builds and uses the real one), the pins."""

from __future__ import annotations

import importlib.resources
import importlib.util
import tomllib
import zipfile
from pathlib import Path

import pytest

from daemon import config

REPO = Path(__file__).resolve().parents[2]


def _load_wheel_check():
    spec = importlib.util.spec_from_file_location("wheel_check", REPO / ".ci" / "wheel_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wheel_check = _load_wheel_check()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_wheel_carries_configs_where_daemon_config_looks():
    forced = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert forced == {"configs": wheel_check.CONFIGS_IN_WHEEL} == {"configs": "daemon/configs"}
    wheel = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert sorted(wheel["packages"]) == sorted(wheel_check.PACKAGES)


def test_in_the_source_tree_the_profiles_are_configs():
    assert config.REPO_CONFIGS == REPO / "configs"
    assert config.template_text() == (REPO / "configs" / "node.toml").read_text()


def test_an_installed_wheel_reads_its_own_copy(tmp_path, monkeypatch):
    """With daemon/configs beside the package (as the wheel installs it) that one is used."""
    (tmp_path / "configs").mkdir()
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    assert config._configs_dir() == tmp_path / "configs"
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path / "elsewhere")
    assert config._configs_dir() == REPO / "configs"


def _wheel(path: Path, skip: str = "", change: str = "") -> Path:
    """A wheel-shaped zip of the tracked files, less `skip`, with `change` altered."""
    with zipfile.ZipFile(path, "w") as archive:
        for name in wheel_check.tracked_files():
            source = REPO / name
            if name == skip or not source.is_file():
                continue
            inside = "daemon/" + name if name.startswith("configs/") else name
            data = source.read_bytes() + (b"\n# changed\n" if name == change else b"")
            archive.writestr(inside, data)
    return path


def test_the_contents_check_passes_a_complete_wheel(tmp_path):
    count = wheel_check.check_contents(_wheel(tmp_path / "ok.whl"))
    assert count > 50  # packages and configs, proto module included


@pytest.mark.parametrize(
    "missing",
    ["daemon/api/proto/gridmesh_inference_pb2.py", "configs/node.toml", "p2p/__init__.py"],
)
def test_the_contents_check_names_a_missing_file(tmp_path, missing):
    with pytest.raises(wheel_check.CheckFailed, match=missing.replace(".", r"\.")):
        wheel_check.check_contents(_wheel(tmp_path / "bad.whl", skip=missing))


def test_the_contents_check_refuses_a_config_that_differs(tmp_path):
    wheel = _wheel(tmp_path / "bad.whl", change="configs/devnet.toml")
    with pytest.raises(wheel_check.CheckFailed, match="configs/devnet.toml .differs"):
        wheel_check.check_contents(wheel)


def test_only_torch_and_what_it_needs_are_linked_in():
    names = {dist.metadata["Name"].lower() for dist in wheel_check.heavy_closure()}
    assert {"torch", "sympy", "filelock"} <= names
    assert not names & {"gridmesh", "trio", "libp2p", "grpcio", "safetensors"}


def test_pins_use_the_maintained_nvml_bindings_and_no_hypercorn():
    pinned = {dep.split("==")[0].lower() for dep in PYPROJECT["project"]["dependencies"]}
    assert "nvidia-ml-py" in pinned
    assert not pinned & {"pynvml", "hypercorn"}
