#!/usr/bin/env bash
# The main job: the whole pipeline (data -> tokenizer -> pretrain -> SFT -> preference pairs -> DPO -> evaluation)
# on the embedded demo data by default. Installs what it needs into the repo's .venv first.
# Artifacts go to ./out, logs to ./logs of the directory you run it from. Re-running skips finished stages and
# resumes an interrupted one. Examples:
#   bash scripts/run_pipeline.sh                          # preset "tiny": CPU, minutes
#   bash scripts/run_pipeline.sh --preset mateconv-0.02b  # the seed's 26M dense model
#   bash scripts/run_pipeline.sh --preset 2gpu --set pretrain.max_steps=2000 sft.max_steps=500
#   bash scripts/run_pipeline.sh --data DIR [--tokenizer PATH]  # your own files (docs/own_data.md), or --data FILE
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
export WANDB_MODE=${WANDB_MODE:-$([ -n "${WANDB_API_KEY:-}" ] && echo online || echo offline)}
exec "$repo/.venv/bin/python" -m mateconv.pipeline run "$@"
