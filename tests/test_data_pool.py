"""The process pool of stages 2 and 3 (mateconv/data/pool.py): results in the input's order, a bounded number of
jobs ahead, a worker's death an error, and no work left running once the caller stops."""
from __future__ import annotations

import os
import time
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from functools import partial
from pathlib import Path

import psutil
import pytest

from mateconv.data.pool import in_order


def square_later(value: int) -> int:
    time.sleep(0.05 * (value % 3 == 0))  # later items finish first
    return value * value


def mark_later(path: Path) -> None:
    time.sleep(0.2)
    path.touch()


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_in_the_input_order_with_at_most_limit_jobs_ahead(workers):
    pulled = []

    def items():
        for value in range(20):
            pulled.append(value)
            yield value

    def job(value):
        return None if value % 5 == 4 else partial(square_later, value)  # an item with no work

    taken = []
    for value, result in in_order(items(), job, workers, limit=3):
        assert len(pulled) <= len(taken) + 3 + 1  # 3 jobs sent and not taken (this one too), one read ahead
        taken.append((value, result))
    assert taken == [(value, None if value % 5 == 4 else value * value) for value in range(20)]


def test_a_worker_that_dies_breaks_the_loop():
    def job(value):
        return partial(os._exit, 1) if value == 2 else partial(square_later, value)

    with pytest.raises(BrokenProcessPool):
        for _ in in_order(range(6), job, workers=2, limit=4):
            pass


def test_a_caller_that_stops_leaves_no_job_running_and_drops_those_not_begun(tmp_path):
    before = {child.pid for child in psutil.Process().children()}
    results = in_order(range(10), lambda value: partial(mark_later, tmp_path / str(value)), workers=2, limit=8)
    with pytest.raises(KeyboardInterrupt), closing(results):
        for _ in results:
            raise KeyboardInterrupt  # as Ctrl-C in the caller's loop
    assert not {child.pid for child in psutil.Process().children()} - before  # the workers have ended
    marked = len(list(tmp_path.iterdir()))
    time.sleep(0.3)
    assert len(list(tmp_path.iterdir())) == marked < 8  # of the 8 sent, those not begun never ran
