#!/usr/bin/env bash
# Stops a training run cleanly (a checkpoint, then exit) and waits for it. docs/operations.md "Stopping a run".
#   bash scripts/stop.sh OUT_DIR [TIMEOUT_SECONDS]  any run writing OUT_DIR (e.g. out/pretrain), however it was started
#       (nohup from a script, the DeepSpeed launcher, torchrun): creates OUT_DIR/STOP; every rank stops after its
#       current step, the run saves a checkpoint and removes the file.
#   bash scripts/stop.sh STAGE [TIMEOUT_SECONDS]    a stage the pipeline started (logs/STAGE.pid): SIGINT to the
#       processes of its group but DeepSpeed's launcher (every rank; the launcher exits once they saved); STAGE=pipeline
#       stops all.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR|STAGE [TIMEOUT_SECONDS]" >&2; exit 2; }
timeout="${2:-300}"
if [ -d "$1" ]; then
    lock="$1/.run.lock"  # a run holds it while it writes there (mateconv.train.stages.claimed)
    if [ -e "$lock" ] && command -v flock > /dev/null && flock -n "$lock" true; then
        echo "no run is writing $1 (none holds $lock): nothing to stop" >&2
        exit 1
    fi
    stop="$1/STOP"
    touch "$stop"
    echo "created $stop; waiting up to ${timeout} s for the run to save a checkpoint and remove it"
    end=$((SECONDS + timeout))
    while [ -e "$stop" ]; do
        if [ "$SECONDS" -ge "$end" ]; then
            echo "$stop is still there after ${timeout} s: is a run writing $1? (delete the file if not)" >&2
            exit 1
        fi
        sleep 1
    done
    echo "stopped: checkpoint $(cat "$1/checkpoints/latest" 2>/dev/null || echo '?') saved; run the same command to resume"
    exit 0
fi
exec "$repo/.venv/bin/python" -m mateconv.pipeline stop "$1" --timeout "$timeout"
