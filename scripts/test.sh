#!/usr/bin/env bash
# The test command: installs what it needs into .venv, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k model`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec .venv/bin/python -m pytest "$@"
