#!/usr/bin/env bash
# Starts the pipeline in the background under nohup, as the seeds do: output in logs/pipeline.log, pid in
# logs/pipeline.pid, one logs/<stage>.log and logs/<stage>.pid per running stage. Arguments go to run_pipeline.sh.
#   bash scripts/launch.sh --preset tiny
#   bash scripts/status.sh; bash scripts/stop.sh pretrain
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p logs
if [ -f logs/pipeline.pid ] && kill -0 "$(cat logs/pipeline.pid)" 2>/dev/null; then
    echo "error: a pipeline is already running (pid $(cat logs/pipeline.pid)); stop it first" >&2
    exit 1
fi
nohup setsid bash "$repo/scripts/run_pipeline.sh" "$@" >>logs/pipeline.log 2>&1 </dev/null &
echo $! >logs/pipeline.pid
echo "pipeline started (pid $!); follow it with: tail -f logs/pipeline.log"
