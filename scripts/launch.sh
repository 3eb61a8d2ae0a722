#!/usr/bin/env bash
# Starts the pipeline in the background under nohup, as the seeds do: output in logs/pipeline.log, pid in
# logs/pipeline.pid, one logs/<stage>.log and logs/<stage>.pid per running stage. Arguments go to run_pipeline.sh.
#   bash scripts/launch.sh --preset tiny
#   bash scripts/status.sh; bash scripts/stop.sh pretrain
# Multi-node (docs/operations.md, "Multi-node"; out/ on storage every node shares, the repo at the same path): the
# training stages run under `deepspeed --hostfile FILE` on every node the file names, started over ssh from here:
#   bash scripts/launch.sh --hostfile hostfile --master_addr 10.0.0.1 --preset 2gpu
# or, without ssh, start it on each node with its place in the hostfile (its logs then go to logs/node<N>/):
#   bash scripts/launch.sh --hostfile hostfile --master_addr 10.0.0.1 --node_rank 0 --preset 2gpu   # on 10.0.0.1
#   bash scripts/launch.sh --hostfile hostfile --master_addr 10.0.0.1 --node_rank 1 --preset 2gpu   # on the next
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
logs=logs
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --hostfile) [ -f "${args[i + 1]:-}" ] || { echo "error: --hostfile ${args[i + 1]:-}: no such file" >&2; exit 2; } ;;
        --node_rank) logs="logs/node${args[i + 1]:-}" ;;
    esac
done
mkdir -p "$logs"
running() {  # process $1 runs: not gone, and not a zombie (a container whose first process reaps no orphans keeps those)
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) && [ "${state:0:1}" != Z ]
}
if [ -f "$logs/pipeline.pid" ] && running "$(cat "$logs/pipeline.pid")"; then
    echo "error: a pipeline is already running (pid $(cat "$logs/pipeline.pid")); stop it first" >&2
    exit 1
fi
nohup setsid bash "$repo/scripts/run_pipeline.sh" --logs "$logs" "$@" >>"$logs/pipeline.log" 2>&1 </dev/null &
echo $! >"$logs/pipeline.pid"
echo "pipeline started (pid $!); follow it with: tail -f $logs/pipeline.log"
