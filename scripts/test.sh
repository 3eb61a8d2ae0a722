#!/usr/bin/env bash
# The test command: installs what it needs into .venv, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k model`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# the suite on up to 4 cores (pytest-xdist; tests/conftest.py groups what must not run side by side); -n 0 runs it
# in this process instead
workers=$(nproc); [ "$workers" -gt 4 ] && workers=4
exec .venv/bin/python -m pytest -n "$workers" --dist loadgroup "$@"
