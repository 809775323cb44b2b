#!/usr/bin/env bash
# sasa_flax on a Cloud TPU VM as the images ship it, run from the repository on every worker:
#
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="
#       git clone https://github.com/OWNER/sasa_flax && bash sasa_flax/scripts/tpu_vm_setup.sh"
#
# Our pins need Python 3.11 or newer (jax 0.10.2, numpy 2.4.6); tpu-ubuntu2204-base (v4,
# v5e, v6e) ships Python 3.10. Where the image's python3 is older than 3.11 this installs
# uv (one static binary, in ~/.local/bin, no root) and a Python 3.11 through it; then it
# makes a virtual environment (default ~/sasa-venv) with requirements-tpu.txt and the
# package, and checks that JAX sees the TPU.
#
#   --dry-run        print the plan, change nothing (what the tests run)
#   --venv DIR       where the environment goes (default: $HOME/sasa-venv)
#   --python X.Y     the interpreter version to install with uv (default: 3.11)
#   --no-check       skip the final jax.devices() check (e.g. on a host without a TPU)
#
# Tested here: the plan for each image's Python (tests/test_tpu_vm_setup.py) and that
# requirements-tpu.txt resolves on Python 3.11. Not run here: on a TPU VM itself.
set -euo pipefail

MINIMUM="3.11"
PYTHON_VERSION="3.11"
VENV="${HOME}/sasa-venv"
DRY_RUN=0
CHECK=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-check) CHECK=0 ;;
    --venv) VENV="$2"; shift ;;
    --python) PYTHON_VERSION="$2"; shift ;;
    *) echo "error: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done

run() {  # prints each step; runs it unless --dry-run
  echo "+ $*"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

# The version of python3 on PATH as X.Y, or nothing.
system_version="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"

at_least() {  # at_least X.Y MIN.OR: version comparison of two X.Y strings
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}

if [[ -n "$system_version" ]] && at_least "$system_version" "$MINIMUM"; then
  echo "python3 is $system_version (>= $MINIMUM): using it"
  run python3 -m venv "$VENV"
else
  echo "python3 is ${system_version:-missing} (< $MINIMUM): installing Python $PYTHON_VERSION with uv"
  if ! command -v uv >/dev/null 2>&1 && [[ ! -x "$HOME/.local/bin/uv" ]]; then
    run sh -c "curl -LsSf https://astral.sh/uv/install.sh | sh"
  fi
  UV="$(command -v uv || echo "$HOME/.local/bin/uv")"
  run "$UV" python install "$PYTHON_VERSION"
  run "$UV" venv --seed --python "$PYTHON_VERSION" "$VENV"
fi
run "$VENV/bin/python" -m pip install -q -r "$REPO/requirements-tpu.txt"
run "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO"
if [[ $CHECK == 1 ]]; then
  run "$VENV/bin/python" -c "import jax; print(jax.device_count(), 'devices:', jax.devices()[0].device_kind)"
fi
echo "done: $VENV/bin/python train.py ... (under nohup or tmux: see docs/training.md)"
