"""One trial: the program's command line from the sampled values, run as a subprocess while its metrics.jsonl is
followed, and the metric read back."""
from __future__ import annotations

import difflib
import json
import signal
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from mateconv.files import read_metrics, tail_text
from mateconv.flags import format_value, render_flags
from mateconv.procs import StageRunner
from mateconv.sweep.config import SweepConfig, SweepError, is_number
from mateconv.train.signals import STOP_FILE


def build_command(config: SweepConfig, values: dict[str, Any], out_dir: Path) -> list[str]:
    values = {**values, "out_dir": str(out_dir)}
    if config.command is None:
        return [sys.executable, config.program, *render_flags(values)]
    expansions = {
        "${env}": [],  # the environment is passed to the subprocess directly
        "${interpreter}": [sys.executable],
        "${program}": [config.program],
        "${args}": render_flags(values),
        "${args_no_hyphens}": [f"{k}={format_value(v)}" for k, v in values.items() if v is not None],
        "${args_no_boolean_flags}": render_flags({k: v for k, v in values.items() if v is not False}),
        "${args_json}": [json.dumps(values)],
    }
    return [part for token in config.command for part in expansions.get(token, [token])]


def read_metric(metrics_path: Path, name: str) -> float:
    """The last value of `name` in a metrics.jsonl (a truncated final line from a killed writer is ignored)."""
    if not metrics_path.is_file():
        raise SweepError(f"trial wrote no metrics file: {metrics_path}")
    try:
        rows = read_metrics(metrics_path)
    except ValueError as error:
        raise SweepError(str(error)) from None
    values = [float(row[name]) for row in rows if is_number(row.get(name))]
    if not values:
        seen = sorted({key for row in rows for key in row})
        close = difflib.get_close_matches(name, seen, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        error = MetricMissing if rows else SweepError
        raise error(f"{metrics_path} has no '{name}' values (keys seen: {', '.join(seen) or 'none'}){hint}")
    return values[-1]


class MetricMissing(SweepError):
    """A metrics.jsonl without the sweep's metric."""


def last_line(log: Path, tail_bytes: int = 4096) -> str:
    """The last line a trial printed (a failed stage's own one-line reason, a traceback's error), from its log (where
    StageRunner heads each run with a `=== ` line); "" when it printed nothing."""
    lines = tail_text(log, tail_bytes).replace("\r", "\n").splitlines()
    for line in reversed(lines):
        if line.startswith("=== "):
            return ""
        if line.strip():
            return line.strip()[:300]
    return ""


def exit_reason(returncode: int, log: Path) -> str:
    """Why a trial ended with `returncode` (not 0): the signal that killed it, else its exit status and the last line
    it printed."""
    if returncode < 0:
        killer = " (the kernel's out-of-memory killer, or kill -9)" if -returncode == signal.SIGKILL else ""
        return f"killed by {signal.Signals(-returncode).name}{killer}"
    reason = last_line(log)
    return f"exit status {returncode}{': ' + reason if reason else ''}"


def trial_env(gpus: str | None) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": gpus} if gpus else {}


def trial_gpus(config: SweepConfig, gpus: str | None) -> list[str | None]:
    """What each trial running at once gets as CUDA_VISIBLE_DEVICES: one GPU of `--gpus 0,1` each, so that many
    trials run side by side (a program runs on one device); all of them for one trial at a time when the YAML's
    `command` starts a launcher that spreads over them (`deepspeed ${program} ...`); no --gpus: the default."""
    if gpus and any(token.split("=")[0] == "--num_gpus" for token in config.command or ()):
        raise SweepError(f"sweep config: command passes --num_gpus, with which DeepSpeed takes GPUs 0 to N-1 whatever "
                         f"CUDA_VISIBLE_DEVICES says, not --gpus {gpus}: leave --num_gpus out (the launcher then "
                         "spreads over the GPUs --gpus lists)")
    if not gpus or config.command is not None:
        return [gpus]
    return [gpu.strip() for gpu in gpus.split(",") if gpu.strip()]


POLL_S = 0.5  # how often a running trial's metrics.jsonl is read


class NewRows:
    """The rows of a metrics.jsonl not handed out before. A file rewritten shorter (a resumed stage drops the rows
    logged after its checkpoint) is followed from its new end."""

    def __init__(self, path: Path):
        self.path = path
        self.seen = 0

    def read(self) -> list[dict]:
        try:
            rows = read_metrics(self.path)
        except (FileNotFoundError, ValueError):  # not written yet; a bad line is reported when the trial ends
            return []
        new, self.seen = rows[self.seen:], len(rows)
        return new


def _follow(trial, rows: NewRows, on_row) -> None:
    """Hands each new row to `on_row` until the trial has ended or `on_row` returns True."""
    while True:
        ended = not wait([trial], timeout=POLL_S).not_done
        for row in rows.read():
            if on_row(row):
                return
        if ended:
            return


def run_following_metrics(runner: StageRunner, name: str, command: list[str], trial_dir: Path, on_row,
                          env: dict[str, str] | None = None, echo: bool = True) -> int:
    """Runs a trial with `runner` in a worker thread while this thread hands each new row of its metrics.jsonl to
    `on_row`. When `on_row` returns True, or an exception ends the following (W&B's agent stops a run by raising one
    in the thread that runs it), a trial still running is asked to stop with a checkpoint (`<trial_dir>/STOP`, which
    the stages check every step) and waited for. Returns the trial's exit status."""
    rows = NewRows(trial_dir / "metrics.jsonl")
    with ThreadPoolExecutor(max_workers=1) as pool:
        trial = pool.submit(runner.run, name, command, env, echo)
        try:
            _follow(trial, rows, on_row)
        finally:
            if not trial.done():
                print(f"[sweep] {name}: asking the trial to stop with a checkpoint ({trial_dir / STOP_FILE})",
                      flush=True)
                (trial_dir / STOP_FILE).touch()
    return trial.result()
