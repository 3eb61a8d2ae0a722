#!/usr/bin/env bash
# Creates .venv (once) and installs MateConv with its dependencies into it, at the versions in constraints.txt
# (those the test suite passed with). PyTorch: its CPU build on a Linux machine without an NVIDIA GPU (PyPI's
# Linux wheel is the CUDA build, GBs of it), else PyPI's; TORCH_SPEC="torch==..." installs that one instead (e.g. the
# CUDA build where nvidia-smi is not on the PATH: TORCH_SPEC="torch==2.13.0"). MATECONV_UNLOCKED=1 installs the
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
    if [ -n "${TORCH_SPEC:-}" ]; then
        "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    elif [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        # the CPU wheel from a wheel folder or index pip is set up with, else from PyTorch's own index
        "$VENV/bin/python" -m pip install -q torch==2.13.0+cpu 2>/dev/null ||
            "$VENV/bin/python" -m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu
    else
        "$VENV/bin/python" -m pip install -q torch==2.13.0
    fi
    # llama-cpp-python (the GGUF export test runs llama.cpp) ships as source only: build its wheel once per
    # machine into a cache (about 25 min on 2 busy cores, see BENCHMARKS.md), then every install takes it from there.
    # Not for this CPU alone (-march=native): on a CPU with AMX that build runs ggml's AMX kernels, which crashed
    # llama.cpp (SIGSEGV) on q8_0 models here; the portable build takes AVX2.
    wheels=${MATECONV_WHEEL_CACHE:-$HOME/.cache/mateconv/wheels-portable}
    llama_cpp=$(grep -E '^llama[-_]cpp[-_]python==' constraints.txt | head -1)
    if [ -n "$llama_cpp" ] && ! ls "$wheels"/llama_cpp_python-"${llama_cpp#*==}"-*.whl >/dev/null 2>&1; then
        echo "setup_env: building $llama_cpp once for this machine (minutes) into $wheels" >&2
        start=$SECONDS
        flags=-DGGML_NATIVE=OFF
        [ "$(uname -m)" = x86_64 ] && flags="$flags -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
        # --no-cache-dir: pip's own wheel cache would hand back a wheel built with other flags
        CMAKE_ARGS="${CMAKE_ARGS:-$flags}" "$VENV/bin/python" -m pip wheel -q --no-cache-dir --no-deps -w "$wheels" \
            "$llama_cpp"
        echo "setup_env: $llama_cpp built in $((SECONDS - start)) s" >&2
    fi
    "$VENV/bin/python" -m pip install -q --find-links "$wheels" "${locked[@]}" -e ".[dev]"
    touch "$stamp"
fi
