#!/usr/bin/env bash
# What runs, its step, loss and ETA (from logs/*.pid and out/<stage>/metrics.jsonl).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
exec "$repo/.venv/bin/python" -m mateconv.pipeline status
