"""Whether a person watches the output, and progress bars only when one does."""
from __future__ import annotations

import functools
import os
import sys

from tqdm import tqdm


def on_terminal() -> bool:
    """Whether a person watches the output live: stdout and stderr are terminals (not `nohup ... > logs/x.log`)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def bars_only_on_a_terminal() -> None:
    """Off a terminal, every tqdm bar, ours and the libraries' (transformers' weight loading and saving), draws into
    os.devnull: a bar redraws itself with `\r`, which in a log file makes one endless line. The bars still count
    (code may read `bar.n`); training prints plain lines instead (mateconv.train.tracking.Progress)."""
    if on_terminal() or getattr(tqdm.__init__, "quiet", False):
        return
    init, sink = tqdm.__init__, open(os.devnull, "w")

    @functools.wraps(init)
    def quiet(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "file": sink})

    quiet.quiet = True  # once per process, however many stages run in it
    tqdm.__init__ = quiet
