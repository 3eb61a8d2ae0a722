"""SIGINT/SIGTERM (`kill -2` on the process group) ask the loop to stop after the current step, with a checkpoint.

Further signals are ignored while stopping (use `kill -9` to abort without a checkpoint).
"""
from __future__ import annotations

import signal
import sys


class StopRequest:
    """A flag set by SIGINT/SIGTERM; the training loop polls it once per optimizer step (all ranks agree)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the DeepSpeed launcher follows our SIGINT with SIGTERM: one request is enough
            return
        self.requested = True
        print(f"\n[train] {signal.Signals(signum).name} received: finishing this step, saving a checkpoint, exiting",
              file=sys.stderr, flush=True)
