"""Work spread over processes, its results taken in the input's order: the parallel loop of stages 2 and 3."""
from __future__ import annotations

import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from mateconv.terminal import pool_worker_signals

Item = TypeVar("Item")


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    pool_worker_signals()
    if initializer:
        initializer(*initargs)


def in_order(items: Iterable[Item], job: Callable[[Item], Callable[[], Any] | None], workers: int, limit: int,
             initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[tuple[Item, Any]]:
    """(item, result) for each item, in the items' order. job(item) is an item's work: a callable taking no arguments
    that pickle can send (a functools.partial of a module-level function), or None for an item with no work (result
    None). `workers` processes, each started with initializer(*initargs), run at most `limit` jobs ahead of the
    caller, so the items are read as the results are taken, not all at once (map would); workers 1 runs the jobs here
    without a pool. A worker that dies (the out-of-memory killer) raises BrokenProcessPool, not a wait for ever as
    with multiprocessing.Pool. Close the generator (contextlib.closing) so that an error or an interrupt in the
    caller's loop ends the pool then: the jobs not begun are dropped, the workers finish theirs and end."""
    if workers == 1:
        if initializer:
            initializer(*initargs)
        for item in items:
            work = job(item)
            yield item, None if work is None else work()
        return
    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(initializer, initargs))
    pending: deque[tuple[Item, Future | None]] = deque()

    def taken() -> tuple[Item, Any]:
        item, future = pending.popleft()
        return item, None if future is None else future.result()

    try:
        for item in items:
            while len(pending) >= limit:
                yield taken()
            work = job(item)
            pending.append((item, None if work is None else pool.submit(work)))
            while pending and (pending[0][1] is None or pending[0][1].done()):
                yield taken()
        while pending:
            yield taken()
    finally:
        pool.shutdown(cancel_futures=True)
