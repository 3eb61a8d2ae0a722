#!/usr/bin/env bash
# Rewrites constraints.txt from what .venv holds now: the versions the test suite passed with.
# Upgrading: rm -rf .venv && MATECONV_UNLOCKED=1 bash scripts/setup_env.sh (newest versions pyproject.toml allows),
# bash scripts/test.sh, and only when it passes: bash scripts/lock_deps.sh, then commit constraints.txt.
# torch is left out: scripts/setup_env.sh pins it through TORCH_SPEC (CPU or CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# Versions the test suite passed with (scripts/lock_deps.sh wrote this; see README, 'Dependencies')."
    .venv/bin/python -m pip list --format=freeze --exclude-editable | grep -v -E "^(torch|mateconv|pip)=="
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pinned packages"
