"""Whether a person watches the output, and progress bars only when one does."""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

from tqdm import tqdm

from mateconv import program_name


def on_terminal() -> bool:
    """Whether a person watches the output live: stdout and stderr are terminals (not `nohup ... > logs/x.log`)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Runs a program's main and exits with its code; every program a user runs starts through it. Output piped into
    a reader that stops early (`| head`) ends the program quietly, as it ends Unix tools (exit code 141, as for
    SIGPIPE), not with a BrokenPipeError traceback; an error's one line (`sys.exit("error: ...")`) still says why.
    Ctrl-C that the program does not handle itself ends it with one line and 130, as a shell reports SIGINT."""
    code = None
    try:
        try:
            code = main()
        except SystemExit as exit:  # sys.exit("error: ...") with lines still buffered for the closed pipe
            code = exit.code
        except KeyboardInterrupt:
            print(f"{program_name()}: interrupted", file=sys.stderr, flush=True)
            code = 128 + signal.SIGINT
        sys.stdout.flush()  # the last buffered lines may be the ones that meet the closed pipe
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        code = code if isinstance(code, str) else 128 + signal.SIGPIPE  # an error's line still goes to stderr
    sys.exit(code)


def exit_interrupted(message: str) -> NoReturn:
    """Ends a program that was told to stop (Ctrl-C, `kill -2`) with its one line and 130, as a shell reports SIGINT:
    the pipeline tells a stage stopped by `stop STAGE` from one that failed (exit 1)."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)


def _as_ctrl_c(signum, frame) -> None:
    """SIGTERM does what Ctrl-C does now: inside asyncio.run, whose own SIGINT handler cancels the main task at its
    next await (raising KeyboardInterrupt anywhere in the loop leaves coroutines made and never awaited), and
    elsewhere Python's default, KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIG_IGN or SIG_DFL, set by code running inside signals_interrupt
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While the block runs, Ctrl-C, `kill -2` and `kill` raise KeyboardInterrupt, so that a program stops with what it
    finished kept: SIGINT is set even where it came ignored (a background job of a script or `bash -c`, where `kill -2`
    would do nothing), and SIGTERM unwinds the same way. The handlers before come back after."""
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _as_ctrl_c)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def pool_worker_signals() -> None:
    """A process pool worker's signals: Ctrl-C reaches the whole process group, and the main process ends the pool;
    SIGTERM is how the pool ends its workers (not main's KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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


@contextlib.contextmanager
def no_transformers_bars() -> Iterator[None]:
    """While the block runs, transformers draws no progress bars (its own and huggingface_hub's): loading a model
    from disk takes a second, and its "Loading weights" bar would stand before the reply or the prompt the user
    waits for. Warnings and errors still show."""
    from transformers.utils import logging  # here: transformers is slow to import, and light programs use this module

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class PlainProgress:
    """A long stage's progress off a terminal (`nohup ... > logs/x.log`), where its tqdm bar draws nothing: a plain
    line for `tail -f` at each tenth of the work and at least every `interval` seconds: done/total, the caller's
    counts, rate, elapsed and ETA. On a terminal it prints nothing (the bar shows the same)."""

    def __init__(self, name: str, total: float, unit: str, enabled: bool = True, interval: float = 30.0):
        self.name, self.total, self.unit, self.interval = name, total, unit, interval
        self.enabled = enabled and total > 0 and not on_terminal()
        self.start = self.last = time.monotonic()
        self.next_tenth = 1

    def update(self, done: float, **counts) -> None:
        now = time.monotonic()
        tenth = int(10 * done / self.total) if self.enabled else 0
        if not self.enabled or (tenth < self.next_tenth and now - self.last < self.interval):
            return
        self.last, self.next_tenth = now, max(tenth + 1, self.next_tenth)
        elapsed = now - self.start
        rate = done / max(elapsed, 1e-9)
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        shown = "".join(f" {name} {value:,}" for name, value in counts.items())
        digits = 0 if self.total >= 100 or float(self.total).is_integer() else 1  # 0.4 MB is not "0/0 MB"
        print(f"[{self.name}] {done:,.{digits}f}/{self.total:,.{digits}f} {self.unit} ({done / self.total:.0%}){shown} "
              f"{rate:,.1f} {self.unit}/s elapsed {duration(elapsed)} eta {eta}", flush=True)
