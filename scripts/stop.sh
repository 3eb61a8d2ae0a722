#!/usr/bin/env bash
# Stops a running stage cleanly: SIGINT to its process group (every DeepSpeed rank), then waits until it has
# saved its checkpoint and exited. Usage: bash scripts/stop.sh STAGE [TIMEOUT_SECONDS]   (STAGE=pipeline stops all)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 STAGE [TIMEOUT_SECONDS]" >&2; exit 2; }
exec "$repo/.venv/bin/python" -m mateconv.pipeline stop "$1" --timeout "${2:-300}"
