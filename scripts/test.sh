#!/usr/bin/env bash
# The test command (`make test`, run by .ci/run): lint, then every test. Starts the local Slurm cluster first
# when this machine can (root + apt-get); elsewhere the slurm-marked tests are deselected, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

$PY -m ruff check .
$PY -m ruff format --check .

markers=()
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash scripts/slurm/up.sh
else
  echo "[test] not root or no apt-get: skipping the slurm-marked tests (the local cluster cannot be started)"
  markers=(-m "not slurm")
fi
$PY -m pytest -q --durations=15 "${markers[@]}" "$@"
