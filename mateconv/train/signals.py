"""When to stop early with a checkpoint: SIGINT/SIGTERM (`kill -2`), or a DeepSpeed launcher that was stopped.

Further signals are ignored while stopping (use `kill -9` to abort without a checkpoint).

`kill -2 <pid of deepspeed>` (the seeds' way to stop `nohup deepspeed ... &`) reaches only the launcher's front
process, which dies of KeyboardInterrupt without telling anyone: the per-node `deepspeed.launcher.launch` process and
the ranks would train on, orphaned. So each rank started by that launcher notes the launcher's parent and treats the
launcher being orphaned as a stop request too.
"""
from __future__ import annotations

import os
import signal
import sys

import psutil

LAUNCHER_MODULE = "deepspeed.launcher.launch"


class LauncherWatch:
    """`orphaned()` is True once the DeepSpeed launcher that started this process has lost its parent."""

    def __init__(self) -> None:
        self.launcher = None
        try:
            parent = psutil.Process(os.getppid())
            if LAUNCHER_MODULE in " ".join(parent.cmdline()):
                self.launcher, self.front_pid = parent, parent.ppid()
        except psutil.Error:
            pass

    def orphaned(self) -> bool:
        if self.launcher is None:
            return False
        try:
            return self.launcher.ppid() != self.front_pid
        except psutil.Error:  # the launcher itself is gone
            return True


class StopRequest:
    """A flag set by SIGINT/SIGTERM or an orphaned launcher; the training loop polls it once per optimizer step
    (all ranks agree)."""

    def __init__(self) -> None:
        self.signalled = False
        self.previous = {}
        self.watch = LauncherWatch()

    @property
    def requested(self) -> bool:
        if not self.signalled and self.watch.orphaned():
            self.signalled = True
            print("\n[train] the DeepSpeed launcher was stopped: finishing this step, saving a checkpoint, exiting",
                  file=sys.stderr, flush=True)
        return self.signalled

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
