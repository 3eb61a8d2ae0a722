#!/usr/bin/env bash
# Creates .venv (once) and installs MateConv with its dependencies into it, at the versions in constraints.txt
# (those the test suite passed with). TORCH_SPEC picks the torch build: the default is the CPU wheel; on a GPU
# machine use e.g. TORCH_SPEC="torch==2.13.0" to take the CUDA build from PyPI. MATECONV_UNLOCKED=1 installs the
# newest versions pyproject.toml allows into a new .venv instead (to upgrade; see scripts/lock_deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.mateconv-installed"
if [ -n "${MATECONV_UNLOCKED:-}" ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    locked=(-c constraints.txt)
    [ -n "${MATECONV_UNLOCKED:-}" ] && locked=()
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    "$VENV/bin/python" -m pip install -q "${locked[@]}" -e ".[dev]"
    touch "$stamp"
fi
