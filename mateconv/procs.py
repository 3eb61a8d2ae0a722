"""Running stages as supervised child processes (own process group, pid file, log tee, SIGINT forwarding), and a
model server (`python -m mateconv.serve`) in the background for stage 7 and the tests.

Each stage runs in a new session so that `scripts/stop.sh STAGE` can send SIGINT to its process group (every rank)
without touching the pipeline that started it.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from mateconv.files import write_atomic
from mateconv.train.signals import LAUNCHER_MODULE


def pid_file(logs_dir: Path, name: str) -> Path:
    return logs_dir / f"{name}.pid"


def read_pid(logs_dir: Path, name: str) -> int | None:
    path = pid_file(logs_dir, name)
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    """Whether process `pid` runs: one that exited but is not yet reaped by its parent (a zombie) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class StageRunner:
    """Runs commands, each in its own process group, teeing output to logs/<name>.log (and, with `echo`, to stdout).
    Commands may run at once from several threads (a sweep's trials, one per GPU).

    A SIGINT or SIGTERM received by the runner is forwarded to every running stage as SIGINT, so each saves a
    checkpoint and exits; the runner then reports that it was interrupted and starts nothing else.
    """

    def __init__(self, logs_dir: Path):
        self.logs_dir = logs_dir
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.children: set[subprocess.Popen] = set()
        self.interrupted = 0  # the number of the signal that interrupted the runner; 0 while none has
        signal.signal(signal.SIGINT, self._forward)
        signal.signal(signal.SIGTERM, self._forward)

    def _forward(self, signum, frame) -> None:
        self.interrupted = signum
        for child in list(self.children):
            if child.poll() is None:
                interrupt_group(child.pid)

    def run(self, name: str, command: list[str], env: dict[str, str] | None = None, echo: bool = True) -> int:
        log_path = self.logs_dir / f"{name}.log"
        print(f"[pipeline] {name}: {shlex.join(command)}", flush=True)  # quoted: it reruns the stage when pasted
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            child = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(env or {})},
            )
            self.children.add(child)
            write_atomic(pid_file(self.logs_dir, name), f"{child.pid}\n")
            try:
                # Copy raw chunks, not lines, so progress bars that redraw with '\r' stay live.
                while chunk := os.read(child.stdout.fileno(), 65536):
                    if echo:
                        try:
                            sys.stdout.buffer.write(chunk)
                            sys.stdout.flush()
                        except BrokenPipeError:  # `| head` has read enough: stop as on Ctrl-C, the stage saving
                            echo = False
                            self._forward(signal.SIGPIPE, None)
                    log.write(chunk)
                    log.flush()
                return child.wait()
            finally:
                pid_file(self.logs_dir, name).unlink(missing_ok=True)
                self.children.discard(child)


def is_deepspeed_launcher(cmdline: list[str]) -> bool:
    """The `deepspeed` command or its per-node `deepspeed.launcher.launch` process."""
    return LAUNCHER_MODULE in cmdline or (len(cmdline) > 1 and Path(cmdline[1]).name == "deepspeed")


def interrupt_group(pgid: int) -> None:
    """SIGINT to the processes of group `pgid` but DeepSpeed's launcher: on SIGINT that sends the ranks SIGTERM and
    kills them 30 s later, saving or not, and dies with a traceback; left alone it exits as the ranks do, after they
    saved. The whole group when it holds nothing else yet (ranks not started)."""
    others = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getpgid(process.pid) == pgid and not is_deepspeed_launcher(process.info["cmdline"] or []):
                others.append(process)
        except (OSError, psutil.Error):
            continue
    if not others:
        try:
            os.killpg(pgid, signal.SIGINT)
        except ProcessLookupError:
            pass
    for process in others:
        try:
            process.send_signal(signal.SIGINT)
        except psutil.Error:
            pass


def group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in process group `pgid`."""
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def writer_of(log: Path) -> int | None:
    """The live process whose standard output is `log` (a run started as `nohup ... > logs/x.log 2>&1 &`, with no
    pid file), the first of a family that shares it (the `deepspeed` command, not its ranks); None if there is none."""
    target, writers = os.path.realpath(log), {}
    for process in psutil.process_iter(["ppid", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.readlink(f"/proc/{process.pid}/fd/1") == target:
                writers[process.pid] = process.info["ppid"]
        except (OSError, psutil.Error):
            continue
    return next((pid for pid, parent in sorted(writers.items()) if parent not in writers), None)


class NotStopped(RuntimeError):
    """`stop` found no such stage running, or it did not stop in time; the message says which and where it looked."""


def stop(logs_dir: Path, name: str, timeout_s: float) -> str:
    """Sends SIGINT to a stage's processes (interrupt_group) and waits until every process in its group has exited.
    Returns a one-line outcome."""
    where = pid_file(logs_dir, name)
    pid = read_pid(logs_dir, name)
    if pid is None or not group_alive(pid):
        looked = f"no {where}" if pid is None else f"process group {pid} of {where} has exited"
        log = logs_dir / f"{name}.log"
        writer = writer_of(log)
        if writer:  # started by hand (`nohup ... > logs/NAME.log &`): its process group may hold the shell too
            raise NotStopped(f"{name}: not started by the pipeline ({looked}); pid {writer} writes {log}: stop it "
                             f"with `kill -2 {writer}` or `bash scripts/stop.sh OUT_DIR`")
        raise NotStopped(f"{name}: not running ({looked})")
    interrupt_group(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_alive(pid):
            # the pipeline that ran the stage ends just after it: wait for that too, so that `launch.sh` run next does
            # not find it still running (one whose stage finished meanwhile goes on: not waited for long)
            pipeline, ending = read_pid(logs_dir, "pipeline"), min(deadline, time.monotonic() + 10)
            while pipeline and is_alive(pipeline) and time.monotonic() < ending:
                time.sleep(0.1)
            return (f"{name}: stopped (what it finished is kept, a training stage's as a checkpoint; run the pipeline "
                    "again to resume)")
        time.sleep(0.5)
    raise NotStopped(f"{name}: still running after {timeout_s:.0f} s (process group {pid}); not killed")


# ---------------------------------------------------------------- a model server in the background

class ServeError(RuntimeError):
    """The server could not be started or reached; shown as one line."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_background(model_path: str | Path, served_model_name: str | None = "mateconv", timeout_s: float = 120.0,
                     extra_args: list[str] | None = None) -> tuple[str, subprocess.Popen]:
    """Starts `python -m mateconv.serve` on a free loopback port and waits until /health answers.

    served_model_name None: the server's default names. Returns (base URL such as "http://127.0.0.1:PORT/v1", the
    process). Stop it with `stop_background(process)`.
    The server's output goes to a log file whose tail is shown if it fails to come up.
    """
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="mateconv-serve-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "mateconv.serve", "--model_path", str(model_path), "--host", "127.0.0.1",
               "--port", str(port), *(["--served_model_name", served_model_name] if served_model_name else []),
               "--api_key", "", *(extra_args or [])]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    process.log_path = log.name
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-5:]
            raise ServeError(f"server exited with code {process.returncode}: {' | '.join(tail)}")
        try:
            if httpx.get(f"{root}/health", timeout=2.0).status_code == 200:
                return f"{root}/v1", process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_background(process)
    raise ServeError(f"server on port {port} not healthy after {timeout_s:.0f} s (log: {log.name})")


def stop_background(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stops a server from `start_background` (SIGTERM, then SIGKILL) and removes its log file."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log_path = getattr(process, "log_path", None)
    if log_path:
        Path(log_path).unlink(missing_ok=True)
