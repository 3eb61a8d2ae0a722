#!/usr/bin/env bash
# Creates .venv (once) and installs MateConv with its dependencies into it.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a GPU
# machine use e.g. TORCH_SPEC="torch" to take the CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.mateconv-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
