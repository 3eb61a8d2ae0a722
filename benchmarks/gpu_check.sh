#!/usr/bin/env bash
# One GPU check (issues 13 and 14), about 8.5 minutes on one H200 (every row has its own time limit: 600 s in all,
# 1150 s with --diagnostics; the rows took well under theirs on the H200), from the repository's files alone:
#   1. the engine (4.pretrain.py's Trainer): tokens/s and MFU of MateConv-0.02B dense, HF Qwen3ForCausalLM with the
#      same weights and the 0.1B MoE, seq 512, eager and torch.compile'd (benchmarks/bench_pretrain.py)
#   2. MiniMind's own trainer against 4.pretrain.py on the same GPU, data and shape, both eager, then both compiled
#      (MiniMind's --use_compile 1; benchmarks/bench_vs_minimind.py; needs ../shared/data and ../shared/peers/minimind,
#      or $MATECONV_SHARED_DATA / $MATECONV_MINIMIND; MiniMind's trainer imports `datasets`)
#   3. decode: generate_tokens (its decode step compiled: CUDA graphs) against transformers generate at batch 1 and 8
#      (benchmarks/bench_decode.py; the two compiles, one per batch size, are its warm-up)
#   4. profiles: where a compiled 0.02B dense step and a compiled 0.1B MoE step spend their time, on the device and on
#      the host, and how busy the device was (benchmarks/bench_pretrain.py --profile; Chrome traces in
#      profile_{dense,moe}_trace.json.gz; on CPU eager)
#   5. with --diagnostics (always with --cpu-smoke): the compiled pair with MateConv at half the batch (about
#      MiniMind's real tokens per step, twice the updates: --mateconv_batch 32), and two ablations of row 2's held-out
#      bpb gap, eager: 4.pretrain.py's trainer on MiniMind's own rows (--mateconv_rows minimind: data layout vs model
#      and trainer), and MateConv's model without its per-head q/k RMSNorm (--qk_norm 0); and the compiled
#      MateConv models with the document mask as SDPA's boolean mask, as FlexAttention (flex_attention) and without
#      it (plain causal attention, MiniMind's kernel: the mask's whole cost; bench_pretrain.py --mask_variants);
#      about 7.5 more minutes
#   --essentials: only what the open targets still need, for a 15-minute device budget (about 6 minutes, limits
#      420 s): the compiled pair (2), the compiled MoE profile (4) and the mask row of 5, whose first variant is the
#      engine's compiled dense and MoE run, so it gives dense tokens/s and the MoE's share of it too
# Each row says why when it cannot run (no CUDA, a missing package or data) instead of stopping the others.
#
#   bash benchmarks/gpu_prepare.sh             # first, here: the shared data, MiniMind and wheels to carry there
#   bash benchmarks/gpu_check.sh               # on the GPU machine; logs and the table under ${GPU_CHECK_OUT:-out/gpu_check}
#   bash benchmarks/gpu_check.sh --diagnostics-only   # row 5 alone: a second command within the 10-minute limit
#   bash benchmarks/gpu_check.sh --essentials         # the open targets' rows alone (table_essentials.md)
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same wiring at tiny sizes on CPU (≤ 3 minutes)
# $PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -u
cd "$(dirname "$0")/.."
# the rows by their log names, in the order they run
MAIN_ROWS="engine minimind minimind_compiled decode profile_dense profile_moe"
DIAGNOSTIC_ROWS="minimind_half_batch minimind_rows minimind_no_qk_norm engine_masks"
SMOKE=0 ROWS=$MAIN_ROWS TABLE_NAME=table
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 ;;
    --diagnostics) ROWS="$MAIN_ROWS $DIAGNOSTIC_ROWS" ;;
    --diagnostics-only) ROWS=$DIAGNOSTIC_ROWS TABLE_NAME=table_diagnostics ;;  # a second command keeps the first table
    --essentials) ROWS="minimind_compiled profile_moe engine_masks" TABLE_NAME=table_essentials ;;
    *) echo "gpu_check: unknown argument $arg (--cpu-smoke, --diagnostics, --diagnostics-only, --essentials)" >&2
       exit 2 ;;
  esac
done
# --cpu-smoke alone runs every row (the compiled pair excepted: see below)
[ $SMOKE = 1 ] && [ "$ROWS" = "$MAIN_ROWS" ] && ROWS="$MAIN_ROWS $DIAGNOSTIC_ROWS"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${GPU_CHECK_OUT:-out/gpu_check}
mkdir -p "$OUT"
TABLE="$OUT/$TABLE_NAME.md"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ $SMOKE = 1 ]; then
  DEVICE=cpu
  TRAIN="--tiny --seq 32 --batch 2 --steps 3 --warmup 1 --rounds 1 --compile 0"
  MINI="--device cpu --dim 64 --layers 2 --seq 64 --batch 4 --train_docs 24 --heldout_docs 4 --save_every 3"
  DECODE="--device cpu --dim 64 --n_layers 2 --new_tokens 8 --repeats 1 --batch_sizes 1 8"
  PROFILE="--tiny --seq 32 --batch 2 --steps 6 --profile 3 --compile 0"
  HALF="--mateconv_batch 2 --compile 0"
  MASKS="--tiny --seq 32 --batch 2 --steps 3 --warmup 1 --rounds 1 --mask_variants"
  LIMIT=(100 100 0 60 60 60 100 100 100 120)
else
  DEVICE=cuda
  TRAIN="--seq 512 --batch 64 --steps 30 --warmup 10 --rounds 1 --compile 0 1"
  # 3 epochs of 40 steps; 4 loader workers each (MiniMind tokenizes in its loader)
  MINI="--device cuda --dim 512 --layers 8 --seq 512 --batch 64 --train_docs 2560 --heldout_docs 100 --epochs 3
        --save_every 20 --num_workers 4"
  DECODE="--device cuda --new_tokens 128 --repeats 2 --batch_sizes 1 8"
  PROFILE="--seq 512 --batch 64 --steps 25 --profile 5 --compile 1"
  HALF="--mateconv_batch 32 --compile 1"
  MASKS="--seq 512 --batch 64 --steps 30 --warmup 10 --rounds 1 --mask_variants"
  # taken on an H200 (2026-12-04): 136, 80, 100 (inductor cache warm), 62 s; a profile ~30 s eager; the pairs now
  # also score every checkpoint (a few seconds more); the mask row (6 compiled runs) is not measured yet
  LIMIT=(150 100 150 70 60 70 150 100 100 200)
fi

"$PY" - "$DEVICE" > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib.util, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"gpu {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
for name in ("transformers", "deepspeed", "safetensors", "tokenizers", "yaml", "triton"):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'MISSING'}")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device")
EOF
ENV_OK=$?
cat "$OUT/env.txt"
printf '| row | status | result |\n| --- | --- | --- |\n' > "$TABLE"

row() {  # row NAME LIMIT_S LOG COMMAND...: runs COMMAND under a time limit, records ok / why not
  local name=$1 limit=$2 log=$3; shift 3
  if [ $ENV_OK != 0 ]; then
    echo "| $name | not run | $(tail -1 "$OUT/env.txt") |" >> "$TABLE"; return
  fi
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  if [ $rc = 0 ]; then
    echo "| $name | ok | $OUT/$log |" >> "$TABLE"
  elif [ $rc = 124 ]; then
    echo "| $name | timed out after ${limit}s | $OUT/$log |" >> "$TABLE"
  else
    echo "| $name | failed (exit $rc): $(grep -v '^\s*$' "$OUT/$log" | tail -1 | tr '|' '/' | cut -c1-160) | $OUT/$log |" >> "$TABLE"
  fi
}

start=$SECONDS
wants() { [[ " $ROWS " == *" $1 "* ]]; }
wants engine && row "engine: 0.02B dense, its HF twin, 0.1B MoE (eager/compiled)" "${LIMIT[0]}" engine.log \
  "$PY" benchmarks/bench_pretrain.py $TRAIN
wants minimind && row "MiniMind's trainer vs 4.pretrain.py, eager" "${LIMIT[1]}" minimind.log \
  "$PY" benchmarks/bench_vs_minimind.py $MINI --compile 0 --out "$OUT/vs_minimind"
# the compiled pair runs on the GPU only (inductor's CPU build would take minutes on a laptop)
wants minimind_compiled && [ $SMOKE = 0 ] && row "MiniMind's trainer vs 4.pretrain.py, both compiled" "${LIMIT[2]}" \
  minimind_compiled.log "$PY" benchmarks/bench_vs_minimind.py $MINI --compile 1 --out "$OUT/vs_minimind_compiled"
wants decode && row "decode vs transformers generate" "${LIMIT[3]}" decode.log \
  "$PY" benchmarks/bench_decode.py $DECODE
wants profile_dense && row "profile: 0.02B dense step" "${LIMIT[4]}" profile_dense.log \
  "$PY" benchmarks/bench_pretrain.py $PROFILE --profile_model dense --trace "$OUT/profile_dense_trace.json.gz"
wants profile_moe && row "profile: 0.1B MoE step" "${LIMIT[5]}" profile_moe.log \
  "$PY" benchmarks/bench_pretrain.py $PROFILE --profile_model moe --trace "$OUT/profile_moe_trace.json.gz"
HALF_NAME="MateConv at half the batch, twice the steps$([ $SMOKE = 0 ] && echo ', both compiled')"
wants minimind_half_batch && row "$HALF_NAME" "${LIMIT[6]}" minimind_half_batch.log \
  "$PY" benchmarks/bench_vs_minimind.py $MINI $HALF --out "$OUT/vs_minimind_half_batch"
wants minimind_rows && row "ablation: MateConv's trainer on MiniMind's rows, eager" "${LIMIT[7]}" minimind_rows.log \
  "$PY" benchmarks/bench_vs_minimind.py $MINI --compile 0 --mateconv_rows minimind --out "$OUT/vs_minimind_rows"
wants minimind_no_qk_norm && row "ablation: MateConv without q/k RMSNorm, eager" "${LIMIT[8]}" minimind_no_qk_norm.log \
  "$PY" benchmarks/bench_vs_minimind.py $MINI --compile 0 --qk_norm 0 --out "$OUT/vs_minimind_no_qk_norm"
wants engine_masks && row "engine: compiled, document mask as SDPA mask / FlexAttention / none" "${LIMIT[9]}" \
  engine_masks.log "$PY" benchmarks/bench_pretrain.py $MASKS

echo
echo "## gpu_check ($DEVICE$([ $SMOKE = 1 ] && echo ', --cpu-smoke'), $((SECONDS - start)) s)"
cat "$TABLE"
for log in $ROWS; do
  [ -f "$OUT/$log.log" ] || continue
  echo; echo "### $log"
  grep -E '^(\||device busy|profile of)' "$OUT/$log.log" || echo "(no table; see $OUT/$log.log)"
done
