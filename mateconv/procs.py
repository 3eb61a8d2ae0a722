"""Running stages as supervised child processes: own process group, pid file, log tee, SIGINT forwarding.

Each stage runs in a new session so that `scripts/stop.sh STAGE` can send SIGINT to its whole process group
(the DeepSpeed launcher and every rank) without touching the pipeline that started it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mateconv.files import write_atomic


def pid_file(logs_dir: Path, name: str) -> Path:
    return logs_dir / f"{name}.pid"


def read_pid(logs_dir: Path, name: str) -> int | None:
    path = pid_file(logs_dir, name)
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageRunner:
    """Runs one command at a time in its own process group, teeing output to logs/<name>.log.

    A SIGINT or SIGTERM received by the runner is forwarded to the running stage as SIGINT, so the stage saves a
    checkpoint and exits; the runner then reports that it was interrupted and starts nothing else.
    """

    def __init__(self, logs_dir: Path):
        self.logs_dir = logs_dir
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.child: subprocess.Popen | None = None
        self.interrupted = False
        signal.signal(signal.SIGINT, self._forward)
        signal.signal(signal.SIGTERM, self._forward)

    def _forward(self, signum, frame) -> None:
        self.interrupted = True
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def run(self, name: str, command: list[str], env: dict[str, str] | None = None) -> int:
        log_path = self.logs_dir / f"{name}.log"
        print(f"[pipeline] {name}: {' '.join(command)}", flush=True)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            self.child = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(env or {})},
            )
            write_atomic(pid_file(self.logs_dir, name), f"{self.child.pid}\n")
            try:
                # Copy raw chunks, not lines, so progress bars that redraw with '\r' stay live.
                while chunk := os.read(self.child.stdout.fileno(), 65536):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    log.write(chunk)
                    log.flush()
                return self.child.wait()
            finally:
                pid_file(self.logs_dir, name).unlink(missing_ok=True)
                self.child = None


def group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in process group `pgid`."""
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def stop(logs_dir: Path, name: str, timeout_s: float) -> str:
    """Sends SIGINT to a stage's process group and waits until every process in it has exited: under the DeepSpeed
    launcher the front process exits at once while the ranks are still saving. Returns a one-line outcome."""
    pid = read_pid(logs_dir, name)
    if pid is None or not group_alive(pid):
        return f"{name}: not running"
    os.killpg(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_alive(pid):
            return f"{name}: stopped (it saved a checkpoint; run the pipeline again to resume)"
        time.sleep(0.5)
    return f"{name}: still running after {timeout_s:.0f} s (process group {pid}); not killed"
