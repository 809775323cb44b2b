"""scripts/tpu_vm_setup.sh: the plan it makes for each Python a TPU VM image may have, and
the TPU requirements resolving on the Python it installs. What needs a TPU VM (the uv
download, libtpu finding the chips) is not run here."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tpu_vm_setup.sh"


def _plan(tmp_path, python_version: str | None, *args: str) -> subprocess.CompletedProcess:
    """The script's --dry-run with a python3 on PATH that says ``python_version`` (None:
    no python3 at all) and no uv."""
    fake = tmp_path / "bin"
    fake.mkdir()
    if python_version is not None:
        (fake / "python3").write_text(f"#!/bin/sh\necho {python_version}\n")
        (fake / "python3").chmod(0o755)
    for tool in ("sort", "head", "dirname", "pwd"):  # what the script needs besides bash
        (fake / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    env = dict(os.environ, PATH=str(fake), HOME=str(tmp_path / "home"))
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), "--dry-run", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("version", ["3.8", "3.9", "3.10", None])
def test_an_image_python_older_than_3_11_gets_one_from_uv(tmp_path, version):
    result = _plan(tmp_path, version)
    assert result.returncode == 0, result.stderr
    steps = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    home = tmp_path / "home"
    assert steps[0].endswith("https://astral.sh/uv/install.sh | sh")
    assert steps[1] == f"{home}/.local/bin/uv python install 3.11"
    assert steps[2] == f"{home}/.local/bin/uv venv --seed --python 3.11 {home}/sasa-venv"
    assert (
        steps[3] == f"{home}/sasa-venv/bin/python -m pip install -q -r {ROOT}/requirements-tpu.txt"
    )
    assert "python3 -m venv" not in result.stdout


@pytest.mark.parametrize("version", ["3.11", "3.12", "3.13"])
def test_an_image_python_of_3_11_or_newer_is_used_as_it_is(tmp_path, version):
    result = _plan(tmp_path, version, "--venv", str(tmp_path / "env"), "--no-check")
    assert result.returncode == 0, result.stderr
    steps = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert steps == [
        f"python3 -m venv {tmp_path}/env",
        f"{tmp_path}/env/bin/python -m pip install -q -r {ROOT}/requirements-tpu.txt",
        f"{tmp_path}/env/bin/python -m pip install -q --no-deps -e {ROOT}",
    ]


def test_an_unknown_argument_is_refused(tmp_path):
    result = _plan(tmp_path, "3.11", "--venvv", "x")
    assert result.returncode == 2 and "unknown argument --venvv" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="resolves for this Python: 3.11")
def test_the_tpu_requirements_resolve_on_python_3_11():
    """pip's resolver against the package index (CI reaches it), as on a TPU VM with the
    script's Python 3.11: jax[tpu] 0.10.2 with its libtpu, every pin found."""
    result = _pip("-r", str(ROOT / "requirements-tpu.txt"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "libtpu-0.0.42.1" in result.stdout and "jax-0.10.2" in result.stdout, result.stdout


@pytest.mark.slow
def test_the_pins_do_not_exist_for_the_images_python_3_10(tmp_path):
    """Why the script installs a Python: on the images' own 3.10 our pins have no wheels
    ("No matching distribution", as a new user saw on every worker)."""
    requirements = str(ROOT / "requirements-tpu.txt")
    result = _pip(
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.10",
        "--target",
        str(tmp_path / "t"),
        "-r",
        requirements,
    )
    assert result.returncode != 0 and "No matching distribution" in result.stderr, result.stdout


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
