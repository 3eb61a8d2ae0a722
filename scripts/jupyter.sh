#!/usr/bin/env bash
# Start JupyterLab from the repo root in the background (nohup), using .venv; print its URL with the token.
# `--stop` stops the one started here. See docs/operations.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/jupyter.sh [--port PORT] [--ip IP] [--log_dir DIR] [--stop]

  --port PORT     port to listen on (default 8888); fails if it is taken
  --ip IP         address to bind (default 127.0.0.1; 0.0.0.0 to reach it from other machines,
                  e.g. a rented GPU box; prefer an SSH tunnel: ssh -L 8888:127.0.0.1:8888 host)
  --log_dir DIR   where jupyter.log, jupyter.pid and jupyter.url (URL with token) go (default logs)
  --stop          stop the JupyterLab started by this script (SIGTERM, then wait)

JupyterLab is installed into .venv on first use if it is missing.
EOF
}

die() { echo "jupyter.sh: $*" >&2; exit 2; }

port=8888 ip=127.0.0.1 log_dir=logs stop=0
while (($#)); do
    case $1 in
        --port|--ip|--log_dir)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --port) port=$2 ;;
                --ip) ip=$2 ;;
                --log_dir) log_dir=$2 ;;
            esac
            shift 2 ;;
        --stop) stop=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    die "--port must be an integer in 1..65535, got '$port'"
fi
[[ -n $ip ]] || die "--ip must not be empty"

cd "$(dirname "$0")/.."
python=.venv/bin/python
[[ -x $python ]] || die ".venv is missing; run scripts/setup_env.sh first"
mkdir -p "$log_dir"
pid_file=$log_dir/jupyter.pid log_file=$log_dir/jupyter.log url_file=$log_dir/jupyter.url

running_pid() {  # prints the pid from the pid file if that process is alive
    local pid
    pid=$(cat "$pid_file" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

if ((stop)); then
    pid=$(running_pid) || { echo "jupyter: not running"; rm -f "$pid_file" "$url_file"; exit 0; }
    kill -TERM "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file" "$url_file"; echo "jupyter: stopped (pid $pid)"; exit 0; }
        sleep 0.2
    done
    die "pid $pid still running after 10 s"
fi

if pid=$(running_pid); then
    echo "jupyter: already running (pid $pid); stop it with: scripts/jupyter.sh --stop"
    cat "$url_file" 2>/dev/null || true
    exit 0
fi
if ! "$python" -c "import jupyterlab" 2>/dev/null; then
    echo "jupyter: JupyterLab is not installed in .venv; installing it (first use only)..."
    "$python" -m pip install -q -c constraints.txt jupyterlab || die "could not install jupyterlab (pip failed; see above)"
fi
why=$("$python" - "$ip" "$port" <<'EOF'
import socket, sys
try:
    with socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET) as s:
        s.bind((sys.argv[1], int(sys.argv[2])))
except OSError as error:  # in use, or not an address of this machine
    print(error.strerror or error)
EOF
)
[[ -z $why ]] || die "cannot listen on $ip:$port: $why"

token=$("$python" -c "import secrets; print(secrets.token_hex(24))")
extra=()
[[ $(id -u) != 0 ]] || extra+=(--allow-root)
echo "=== $(date '+%F %T') jupyter lab on $ip:$port" >>"$log_file"
nohup "$python" -m jupyterlab --no-browser --ip="$ip" --port="$port" --ServerApp.port_retries=0 \
    --ServerApp.root_dir="$PWD" --IdentityProvider.token="$token" "${extra[@]}" >>"$log_file" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pid_file"

host=$ip
[[ $ip != 0.0.0.0 ]] || host=$(hostname)
url="http://$host:$port/lab?token=$token"
for _ in $(seq 120); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; die "JupyterLab exited at start; see $log_file"; }
    if "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://$ip:$port/api/status?token=$token" 2>/dev/null; then
        (umask 077; echo "$url" >"$url_file")  # the token is a password: readable by you only
        echo "jupyter: running (pid $pid), log $log_file"
        echo "$url"
        exit 0
    fi
    sleep 0.5
done
die "JupyterLab (pid $pid) did not answer within 60 s; see $log_file"
