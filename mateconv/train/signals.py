"""When to stop early with a checkpoint: SIGINT/SIGTERM (`kill -2`), a DeepSpeed launcher that was stopped, or a stop
file (`touch <out_dir>/STOP`); and `TrainingHalted`, the one-line error of a run that cannot go on.

Further signals are ignored while stopping (use `kill -9` to abort without a checkpoint).

`kill -2 <pid of deepspeed>` (the seeds' way to stop `nohup deepspeed ... &`) reaches only the launcher's front
process, which dies of KeyboardInterrupt without telling anyone: the per-node `deepspeed.launcher.launch` process and
the ranks would train on, orphaned. So each rank started by that launcher notes the launcher's parent and treats the
launcher being orphaned as a stop request too.

A shell without job control (a script, `bash -c`, cron) starts background jobs with SIGINT ignored, and the
`deepspeed` front process keeps it ignored: there `kill -2` does nothing at all. The ranks set their own handler, so
SIGINT to the whole process group still reaches them, but nothing can make the front process hear it; the run says so
when it starts (`stop_hint`), and the stop file and SIGTERM (`kill <pid>`) work however the run was started.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil

LAUNCHER_MODULE = "deepspeed.launcher.launch"
STOP_FILE = "STOP"


class TrainingHalted(RuntimeError):
    """The run cannot go on (the disk filled up during a save, the loss stayed NaN/inf): raised on every rank with a
    one-line reason after the ranks agreed; the stage exits with it (status 1)."""


def ignores_sigint(pid: int) -> bool:
    """Whether process `pid` ignores SIGINT (the SigIgn mask in /proc; False where that cannot be read)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    return False


class LauncherWatch:
    """`orphaned()` is True once the DeepSpeed launcher that started this process has lost its parent."""

    def __init__(self) -> None:
        self.launcher = None
        self.front_pid = None
        try:
            parent = psutil.Process(os.getppid())
            if LAUNCHER_MODULE in " ".join(parent.cmdline()):
                self.launcher, self.front_pid = parent, parent.ppid()
        except psutil.Error:
            pass

    def orphaned(self) -> bool:
        if self.launcher is None:
            return False
        try:  # front_pid 1: the launcher was orphaned before this rank looked (stopped while it started)
            return self.front_pid == 1 or self.launcher.ppid() != self.front_pid
        except psutil.Error:  # the launcher itself is gone
            return True


class StopRequest:
    """A flag set by SIGINT/SIGTERM, an orphaned launcher or the stop file; the training loop polls it once per
    optimizer step (all ranks agree). A stop file older than this process is left from before it started: ignored
    (and `remove_stale` deletes it)."""

    def __init__(self, out_dir: Path) -> None:
        self.signalled = False
        self.previous = {}
        self.watch = LauncherWatch()
        self.stop_file = Path(out_dir) / STOP_FILE
        self.started = psutil.Process().create_time()

    def file_requested(self) -> bool:
        try:
            return self.stop_file.stat().st_mtime >= self.started
        except OSError:
            return False

    @property
    def requested(self) -> bool:
        if not self.signalled and self.watch.orphaned():
            self.signalled = True
            print("\n[train] the DeepSpeed launcher was stopped: finishing this step, saving a checkpoint, exiting",
                  file=sys.stderr, flush=True)
        return self.signalled or self.file_requested()

    def remove_stale(self) -> None:
        if self.stop_file.exists() and not self.file_requested():
            self.stop_file.unlink(missing_ok=True)
            print(f"[train] removed {self.stop_file}, left from before this run started", flush=True)

    def stop_hint(self) -> str:
        """One line: how to stop this run with a checkpoint, and whether `kill -2` will do it."""
        front = self.watch.front_pid if self.watch.front_pid != 1 else None  # never the init process
        if front is not None and ignores_sigint(front):
            return (f"[train] the deepspeed launcher (pid {front}) ignores SIGINT (it was started in the background of "
                    f"a script or other shell without job control), so `kill -2 {front}` will not stop this run; "
                    f"stop it with a checkpoint by `touch {self.stop_file}`, `kill {front}` or "
                    f"`kill -INT -- -{os.getpgid(front)}` (its process group)")
        pid = front if front is not None else os.getpid()
        return f"[train] to stop with a checkpoint: `touch {self.stop_file}`, `kill -2 {pid}` or `kill {pid}`"

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signalled:  # the DeepSpeed launcher follows our SIGINT with SIGTERM: one request is enough
            return
        self.signalled = True
        print(f"\n[train] {signal.Signals(signum).name} received: finishing this step, saving a checkpoint, exiting",
              file=sys.stderr, flush=True)
