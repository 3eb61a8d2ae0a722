#!/usr/bin/env bash
# The test command: installs what it needs into .venv, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k model`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# the suite on up to 4 cores (pytest-xdist: each module on one worker, the long ones first, see tests/conftest.py);
# -n 0 runs it in this process instead
workers=$(nproc); [ "$workers" -gt 4 ] && workers=4
exec .venv/bin/python -m pytest -n "$workers" --dist loadscope --no-loadscope-reorder "$@"
