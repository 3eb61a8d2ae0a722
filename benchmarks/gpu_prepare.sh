#!/usr/bin/env bash
# Prepares the checkout for benchmarks/gpu_check.sh on a lent GPU machine that gets the repository only and can
# download nothing: copies the shared data and MiniMind into gpu_carry/ (git-ignored) and fetches the
# wheels MiniMind's trainer needs beyond a CUDA PyTorch image (`datasets`, `dill`, `multiprocess`) into .whl/.
#
#   bash benchmarks/gpu_prepare.sh      # here, with package-registry access; then, on the GPU machine, carrying
#                                       # gpu_carry and .whl, the command it prints
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${MATECONV_SHARED_DATA:-../shared/data}
MINIMIND=${MATECONV_MINIMIND:-../shared/peers/minimind}
for needed in "$SHARED" "$MINIMIND/trainer/train_pretrain.py"; do
  [ -e "$needed" ] || { echo "gpu_prepare: $needed not found (set MATECONV_SHARED_DATA / MATECONV_MINIMIND)" >&2; exit 1; }
done
rm -rf gpu_carry
mkdir -p gpu_carry
cp -r "$SHARED" gpu_carry/data  # about 19 MB: the carried tree may hold 64 MiB
cp -r "$MINIMIND" gpu_carry/minimind
PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
echo "gpu_carry/: $(du -sh gpu_carry | cut -f1), .whl/: $(ls .whl | tr '\n' ' ')"
cat <<'EOF'
On the GPU machine (carry: gpu_carry .whl):
  python3 -m pip install -q --no-index --no-deps .whl/*.whl
  MATECONV_SHARED_DATA=$PWD/gpu_carry/data MATECONV_MINIMIND=$PWD/gpu_carry/minimind bash benchmarks/gpu_check.sh
With 15 minutes of device time in all, give the open targets' rows the first command (add --essentials, about
6 minutes), then the full check or --diagnostics-only with what is left.
EOF
