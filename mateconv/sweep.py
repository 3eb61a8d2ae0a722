"""Hyperparameter sweeps from one YAML file in W&B's sweep schema, run by either of two backends.

- `wandb`: `wandb.sweep` registers the sweep, `wandb.agent` asks W&B for parameters; each run starts the program.
- `optuna`: an embedded Optuna study in `out/sweeps/<name>/study.db` (sqlite, so an interrupted sweep resumes),
  works offline, and writes a summary (best parameters, a table, a plot) next to the study.

Either way a trial is the program run as a subprocess with `--key value` flags (`mateconv.flags`) plus
`--out_dir <trial dir>`; the metric is the last value of `metric.name` in the trial's `metrics.jsonl` (W&B's default
summary: the last value). While a trial runs, its metrics.jsonl is followed: the Optuna backend reports each value of
the metric to the study's pruner (W&B's `early_terminate`), the W&B backend logs each row into the run; a trial
pruned or stopped by W&B is asked to stop with a checkpoint (`<trial dir>/STOP`).
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import netrc
import os
import queue
import re
import shlex
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from mateconv.config import STAGE_PROGRAMS, ConfigError, check_key, resolve
from mateconv.files import UniqueKeyLoader, read_metrics, save_figure, write_atomic, yaml_error
from mateconv.flags import format_value, render_flags
from mateconv.procs import StageRunner, is_alive
from mateconv.train.signals import STOP_FILE

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL_KEYS = ("program", "method", "metric", "parameters", "name", "description", "command", "early_terminate",
                  "project", "entity", "run_cap")
METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
PARAMETER_KEYS = ("value", "values", "distribution", "min", "max", "q", "mu", "sigma", "a", "b", "probabilities",
                  "parameters")
# Distributions the Optuna backend maps; W&B also knows the ones below, which only `--backend wandb` runs.
OPTUNA_DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "q_uniform", "log_uniform",
                        "log_uniform_values", "q_log_uniform_values")
WANDB_ONLY_DISTRIBUTIONS = ("q_log_uniform", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal",
                            "log_normal", "q_log_normal", "beta", "q_beta")
EARLY_TERMINATE_KEYS = ("type", "min_iter", "max_iter", "s", "eta", "strict")
COMMAND_MACROS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}",
                  "${args_no_boolean_flags}", "${args_json}")


class SweepError(ValueError):
    """A sweep config or a trial that cannot be used; the message names the problem."""


class SweepLoader(UniqueKeyLoader):
    """YAML 1.1 reads a number in exponent form without a dot (`min: 1e-5`, as sweep configs write learning rates) as
    text; here it is a number, as YAML 1.2 and W&B's examples have it."""


SweepLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


@dataclass(frozen=True)
class Param:
    name: str
    distribution: str  # one of OPTUNA_DISTRIBUTIONS or WANDB_ONLY_DISTRIBUTIONS
    value: Any = None
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    q: float | None = None


@dataclass(frozen=True)
class SweepConfig:
    name: str
    program: str
    method: str
    metric: str | None
    goal: str
    params: dict[str, Param]
    command: tuple[str, ...] | None
    early_terminate: dict | None  # W&B's hyperband keys, checked
    raw: dict  # the YAML as read, handed to wandb.sweep unchanged


def _check_keys(where: str, given: dict, allowed: tuple[str, ...]) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(allowed)})"
            raise SweepError(f"{where}: unknown key '{key}'{hint}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_param(name: str, spec: Any) -> Param:
    where = f"parameter '{name}'"
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping such as {{values: [...]}} or {{min: .., max: ..}}, got {spec!r}")
    _check_keys(where, spec, PARAMETER_KEYS)
    if "parameters" in spec:
        raise SweepError(f"{where}: nested parameters are not supported; the program takes flat --key value flags")
    distribution = spec.get("distribution")
    if "value" in spec and distribution in (None, "constant"):
        return Param(name, "constant", value=spec["value"])
    if "values" in spec and distribution in (None, "categorical"):
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: 'values' must be a non-empty list")
        for v in values:
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise SweepError(f"{where}: values must be numbers, strings, booleans or null, got {v!r}")
        return Param(name, "categorical", values=tuple(values))
    if distribution is None:
        if "min" not in spec or "max" not in spec:
            raise SweepError(f"{where}: give 'value', 'values', or 'min' and 'max' (with an optional 'distribution')")
        # W&B's inference: integer bounds sample integers, anything else floats.
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        distribution = "int_uniform" if both_int else "uniform"
    if distribution in WANDB_ONLY_DISTRIBUTIONS:
        return Param(name, distribution)
    if distribution not in OPTUNA_DISTRIBUTIONS:
        close = difflib.get_close_matches(str(distribution), OPTUNA_DISTRIBUTIONS + WANDB_ONLY_DISTRIBUTIONS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SweepError(f"{where}: unknown distribution '{distribution}'{hint}")
    if distribution in ("constant", "categorical"):
        needed = "value" if distribution == "constant" else "values"
        raise SweepError(f"{where}: distribution '{distribution}' needs '{needed}'")
    for key in ("min", "max"):
        if not _is_number(spec.get(key)):
            raise SweepError(f"{where}: distribution '{distribution}' needs a numeric '{key}'")
    low, high = spec["min"], spec["max"]
    if not low < high:
        raise SweepError(f"{where}: min ({low}) must be smaller than max ({high})")
    if distribution in ("log_uniform_values", "q_log_uniform_values") and low <= 0:
        raise SweepError(f"{where}: {distribution} takes values, so min must be > 0 (got {low}); "
                         "for natural-log exponents use 'log_uniform'")
    if distribution == "int_uniform" and not all(isinstance(x, int) for x in (low, high)):
        raise SweepError(f"{where}: int_uniform needs integer min and max")
    q = spec.get("q", 1)
    if distribution.startswith("q_") and not (_is_number(q) and q > 0):
        raise SweepError(f"{where}: q must be a positive number")
    return Param(name, distribution, low=low, high=high, q=q if distribution.startswith("q_") else None)


def parse_early_terminate(spec: Any) -> dict:
    """W&B's `early_terminate` (hyperband, the only type W&B knows), checked as W&B's schema checks it."""
    where = "sweep config early_terminate"
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping such as {{type: hyperband, min_iter: 3}}, got {spec!r}")
    _check_keys(where, spec, EARLY_TERMINATE_KEYS)
    if spec.get("type") != "hyperband":
        raise SweepError(f"{where}: type must be hyperband, got {spec.get('type')!r}")
    for key in ("min_iter", "max_iter", "s"):
        if key in spec and not (isinstance(spec[key], int) and not isinstance(spec[key], bool) and spec[key] >= 1):
            raise SweepError(f"{where}: {key} must be a positive integer, got {spec[key]!r}")
    if "eta" in spec and not (_is_number(spec["eta"]) and spec["eta"] > 1):
        raise SweepError(f"{where}: eta must be a number above 1, got {spec['eta']!r}")
    if "min_iter" not in spec and not ("max_iter" in spec and "s" in spec):
        raise SweepError(f"{where}: give min_iter, or max_iter and s")
    return spec


def parse_sweep_config(raw: Any, default_name: str = "sweep") -> SweepConfig:
    if not isinstance(raw, dict):
        raise SweepError("sweep config: expected a mapping at the top level")
    _check_keys("sweep config", raw, TOP_LEVEL_KEYS)
    for key in ("program", "method", "parameters"):
        if key not in raw:
            raise SweepError(f"sweep config: missing '{key}'")
    if raw["method"] not in METHODS:
        raise SweepError(f"sweep config: method must be one of {', '.join(METHODS)}, got {raw['method']!r}")
    metric, goal = None, "minimize"
    if "metric" in raw:
        if not isinstance(raw["metric"], dict) or "name" not in raw["metric"]:
            raise SweepError("sweep config: metric must be a mapping with 'name' (and 'goal')")
        _check_keys("sweep config metric", raw["metric"], ("name", "goal", "target"))
        metric, goal = str(raw["metric"]["name"]), raw["metric"].get("goal", "minimize")
        if goal not in GOALS:
            raise SweepError(f"sweep config: metric goal must be minimize or maximize, got {goal!r}")
        if "target" in raw["metric"] and not _is_number(raw["metric"]["target"]):
            raise SweepError(f"sweep config: metric target must be a number, got {raw['metric']['target']!r}")
    elif raw["method"] == "bayes":
        raise SweepError("sweep config: method 'bayes' needs a metric {name, goal}")
    if not isinstance(raw["parameters"], dict) or not raw["parameters"]:
        raise SweepError("sweep config: 'parameters' must be a non-empty mapping")
    params = {str(k): parse_param(str(k), v) for k, v in raw["parameters"].items()}
    if raw["method"] == "grid":
        for p in params.values():
            if p.distribution not in ("constant", "categorical"):
                raise SweepError(f"parameter '{p.name}': method 'grid' needs 'values' or 'value', not a distribution")
    run_cap = raw.get("run_cap")
    if run_cap is not None and not (isinstance(run_cap, int) and not isinstance(run_cap, bool) and run_cap >= 1):
        raise SweepError(f"sweep config: run_cap must be a positive integer, got {run_cap!r}")
    command = raw.get("command")
    if command is not None:
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise SweepError("sweep config: command must be a list of strings")
        for token in command:
            if token.startswith("${") and token not in COMMAND_MACROS:
                raise SweepError(f"sweep config: unknown command macro {token} (known: {', '.join(COMMAND_MACROS)})")
        command = tuple(command)
    early_terminate = raw.get("early_terminate")
    if early_terminate is not None:
        if metric is None:
            raise SweepError("sweep config: early_terminate needs a metric {name, goal}")
        early_terminate = parse_early_terminate(early_terminate)
    return SweepConfig(name=str(raw.get("name", default_name)), program=str(raw["program"]), method=raw["method"],
                       metric=metric, goal=goal, params=params, command=command, early_terminate=early_terminate,
                       raw=raw)


def load_sweep_config(path: str | Path, program: str | None = None) -> SweepConfig:
    """The sweep YAML at `path`; `program`, when given (run_sweep's `--mode`), replaces the file's program."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep config not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=SweepLoader)
    except yaml.YAMLError as e:
        raise SweepError(f"sweep config {yaml_error(path, e)}") from None
    if program is not None and isinstance(raw, dict):
        raw = {**raw, "program": program}
    try:
        config = parse_sweep_config(raw, default_name=path.stem)
    except SweepError as e:
        raise SweepError(f"{path}: {e}") from None
    if config.command is not None and "${program}" not in config.command:
        return config
    # as W&B does, from the current directory; then this repository's own stages (`program: 4.pretrain.py` from
    # elsewhere): every trial failed with the program not found
    found = next((place for place in (Path(config.program), REPO / config.program) if place.is_file()), None)
    if found is None:
        raise SweepError(f"{path}: program {config.program} not found (in {Path.cwd()} or {REPO})")
    if found.resolve().parent == REPO and found.name in (*STAGE_PROGRAMS.values(), *ONE_PROGRAMS):
        check_stage_parameters(config, path)
    return replace(config, program=str(found.resolve()))


# The seeds' one training programs (mateconv.train.stages.main_one_program): their flags are the stages' config keys
ONE_PROGRAMS = ("pretrain_sft_lora.py", "train.py")
# Command-line names a stage program reads beside its config keys (mateconv.config.parse_args)
STAGE_ARGUMENTS = ("mode", "config", "overrides")


def check_stage_parameters(config: SweepConfig, path: Path) -> None:
    """Each parameter of a sweep over a stage program is a config key of it, and each value it may take (`value`,
    `values`) one of that key's: else every trial would fail the same way, one after the other."""
    for param in config.params.values():
        if param.name in STAGE_ARGUMENTS:
            continue
        values = [param.value] if param.distribution == "constant" else list(param.values)
        values = [value for value in values if value is not None]  # null: the flag is left out
        try:
            if not values and param.name != "preset":  # a distribution: its samples are numbers
                resolve(param.name)
            for value in values:
                check_key(param.name, value)
        except ConfigError as e:
            raise SweepError(f"{path}: parameter '{param.name}': {e}") from None


# ---------------------------------------------------------------------------------------------------- commands

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
    values = [float(row[name]) for row in rows if _is_number(row.get(name))]
    if not values:
        seen = sorted({key for row in rows for key in row})
        raise SweepError(f"{metrics_path} has no '{name}' values (keys seen: {', '.join(seen) or 'none'})")
    return values[-1]


def trial_env(gpus: str | None) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": gpus} if gpus else {}


def trial_gpus(config: SweepConfig, gpus: str | None) -> list[str | None]:
    """What each trial running at once gets as CUDA_VISIBLE_DEVICES: one GPU of `--gpus 0,1` each, so that many
    trials run side by side (a program runs on one device); all of them for one trial at a time when the YAML's
    `command` starts a launcher that spreads over them (`deepspeed --num_gpus 2 ...`); no --gpus: the default."""
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


# ---------------------------------------------------------------------------------------------------- backends

def wandb_available() -> bool:
    """True when W&B can be reached: not in offline/disabled mode and an API key is configured."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def suggest(trial, param: Param) -> Any:
    """Samples one parameter with an Optuna trial. Log scales sample values, never exponents."""
    d, name = param.distribution, param.name
    if d == "constant":
        return param.value
    if d == "categorical":
        return trial.suggest_categorical(name, list(param.values))
    if d == "uniform":
        return trial.suggest_float(name, param.low, param.high)
    if d == "int_uniform":
        return trial.suggest_int(name, param.low, param.high)
    if d == "q_uniform":
        return trial.suggest_float(name, param.low, param.high, step=param.q)
    if d == "log_uniform_values":
        return trial.suggest_float(name, param.low, param.high, log=True)
    if d == "log_uniform":  # W&B: min/max are natural-log exponents; exp(U(min, max)) is log-uniform on the values
        return trial.suggest_float(name, math.exp(param.low), math.exp(param.high), log=True)
    if d == "q_log_uniform_values":
        value = trial.suggest_float(name, param.low, param.high, log=True)
        return round(value / param.q) * param.q
    raise SweepError(f"parameter '{name}': distribution '{d}' is supported only by --backend wandb")


def _make_sampler(config: SweepConfig, seed: int):
    import optuna

    if config.method == "grid":
        space = {p.name: list(p.values) for p in config.params.values() if p.distribution == "categorical"}
        return optuna.samplers.GridSampler(space, seed=seed)
    if config.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, len(config.params))))


def make_pruner(config: SweepConfig):
    """W&B's hyperband `early_terminate` as Optuna's HyperbandPruner with the same rungs (min_iter, min_iter * eta,
    ...) and reduction factor eta. The resource is counted as W&B counts iterations: the values of the metric logged
    so far (evaluations), so one YAML stops trials at the same points on either backend. No early_terminate: no
    pruning."""
    import optuna

    spec = config.early_terminate
    if spec is None:
        return optuna.pruners.NopPruner()
    eta = spec.get("eta", 3)
    if eta != int(eta):
        raise SweepError(f"early_terminate: the optuna backend needs an integer eta (Optuna's reduction_factor), "
                         f"got {eta}")
    eta = int(eta)
    # max_iter and s: W&B's lowest band is max_iter / eta^s
    min_resource = spec["min_iter"] if "min_iter" in spec else max(1, int(spec["max_iter"] / eta ** spec["s"]))
    return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=spec.get("max_iter", "auto"),
                                          reduction_factor=eta)


def grid_size(config: SweepConfig) -> int:
    return math.prod(len(p.values) for p in config.params.values() if p.distribution == "categorical")


class _SweepLock:
    """One runner per sweep directory; a stale pid file from a killed runner is taken over."""

    def __init__(self, sweep_dir: Path):
        self.path = sweep_dir / "sweep.pid"

    def __enter__(self):
        try:
            pid = int(self.path.read_text().strip())
        except (FileNotFoundError, ValueError):
            pid = None
        if pid is not None and pid != os.getpid() and is_alive(pid):
            raise SweepError(f"sweep in {self.path.parent} is already running (pid {pid})")
        write_atomic(self.path, f"{os.getpid()}\n")
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


class TrialFailed(Exception):
    """A trial that ran but gave no usable metric; Optuna records it as FAIL and the sweep goes on."""


def _requeue(study, trial) -> None:
    """Marks a trial as interrupted (left out of counts and summaries) and queues its parameters again with its
    trial dir, so that the stage resumes from the checkpoint it saved there."""
    study.set_user_attr(f"interrupted_{trial.number}", True)
    resume = {"trial_dir": trial.user_attrs["trial_dir"]} if "trial_dir" in trial.user_attrs else {}
    study.enqueue_trial(trial.params, user_attrs=resume, skip_if_exists=False)


def _number(trial) -> int:
    """The number of a trial's directory and log (`trial_0000`): a trial run again after an interruption keeps its
    first run's, whatever number Optuna gave the run again."""
    directory = trial.user_attrs.get("trial_dir")
    return int(Path(directory).name.removeprefix("trial_")) if directory else trial.number


def _finished(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False,
                                           states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
               if not study.user_attrs.get(f"interrupted_{t.number}"))


# What a stored study's trials were drawn and scored under (and the metric's name and goal): a resume with another of
# these would mix two searches
SEARCH_KEYS = ("program", "command", "method", "parameters")


def search_digest(config: SweepConfig) -> str:
    """The digest of a sweep's search (SEARCH_KEYS, the metric). A program of this repository counts by its name here,
    so that `--mode dpo` (which names it by its full path) and `program: 9.train_dpo.py` are one search, and a clone
    moved elsewhere resumes its studies."""
    search = {key: config.raw.get(key) for key in SEARCH_KEYS} | {"metric": [config.metric, config.goal]}
    program = Path(str(search["program"]))
    if program.is_absolute() and program.parent == REPO:
        search["program"] = program.name
    return hashlib.sha256(json.dumps(search, sort_keys=True, default=str).encode()).hexdigest()


def check_same_search(study, config: SweepConfig, sweep_dir: Path) -> None:
    """A new study keeps a digest of its search; a resumed one must have the same (a study stored without one takes
    this one's)."""
    digest = search_digest(config)
    stored = study.user_attrs.get("search_digest")
    if stored is None:
        study.set_user_attr("search_digest", digest)
    elif stored != digest:
        raise SweepError(f"{sweep_dir}: the sweep config changed since study '{config.name}' started there (program, "
                         f"command, method, metric or parameters): give it a new name (`name:` in the YAML) to start "
                         f"a new study, or delete {sweep_dir} to start this one over")


def run_optuna(config: SweepConfig, count: int | None, out_root: Path, gpus: str | None = None,
               seed: int = 0) -> Path:
    """Runs the sweep until `count` trials have finished in total (resuming the stored study). Returns its dir."""
    import optuna
    from optuna.trial import TrialState

    if config.metric is None:
        raise SweepError("the optuna backend needs a metric {name, goal} in the sweep config")
    for p in config.params.values():
        if p.distribution in WANDB_ONLY_DISTRIBUTIONS:
            raise SweepError(f"parameter '{p.name}': distribution '{p.distribution}' is supported only by "
                             f"--backend wandb (optuna maps: {', '.join(OPTUNA_DISTRIBUTIONS)})")
    run_cap = config.raw.get("run_cap")  # W&B's cap on the sweep's runs
    if count is None:
        if config.method != "grid" and not run_cap:
            raise SweepError(f"method '{config.method}' needs --count or run_cap (grid defaults to the grid size)")
        count = grid_size(config) if config.method == "grid" else run_cap
    if config.method == "grid":
        count = min(count, grid_size(config))
    if run_cap:
        count = min(count, run_cap)
    sweep_dir = out_root / config.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported by our own one-line messages
    with _SweepLock(sweep_dir):
        study = optuna.create_study(study_name=config.name, storage=f"sqlite:///{sweep_dir / 'study.db'}",
                                    direction=config.goal, load_if_exists=True, pruner=make_pruner(config))
        check_same_search(study, config, sweep_dir)
        # A resumed study must not replay the random draws of the first session.
        study.sampler = _make_sampler(config, seed + len(study.trials))
        # Trials a killed runner left RUNNING: fail them and run their parameters again.
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
            _requeue(study, trial)
        runner = StageRunner(sweep_dir)
        slots = trial_gpus(config, gpus)
        free = queue.Queue()
        for gpu in slots:
            free.put(gpu)

        def objective(trial) -> float:
            gpu = free.get()
            try:
                return run_trial(trial, gpu)
            finally:
                free.put(gpu)

        def run_trial(trial, gpu: str | None) -> float:
            values = {name: suggest(trial, p) for name, p in config.params.items()}
            trial_dir = Path(trial.user_attrs.get("trial_dir", sweep_dir / f"trial_{trial.number:04d}"))
            command = build_command(config, values, trial_dir)
            trial.set_user_attr("trial_dir", str(trial_dir))
            trial.set_user_attr("command", command)
            trial.set_user_attr("values", values)
            trial_dir.mkdir(parents=True, exist_ok=True)
            where = f" on GPU {gpu} (log: {sweep_dir / trial_dir.name}.log)" if len(slots) > 1 else ""
            print(f"[sweep] trial {_number(trial)} ({_finished(study) + 1}/{count}){where}: "
                  + " ".join(f"{k}={format_value(v)}" for k, v in values.items()), flush=True)
            evaluations = []  # (step, value) of each value of the metric, reported as Optuna step 1, 2, ...
            pruned = []

            def report(row: dict) -> bool:
                if not _is_number(row.get(config.metric)):
                    return False
                evaluations.append((row.get("step"), float(row[config.metric])))
                step, value = evaluations[-1]
                trial.report(value, step=len(evaluations))
                if not trial.should_prune():
                    return False
                pruned.append(step)
                print(f"[sweep] trial {_number(trial)} pruned at step {step}: {config.metric}={value:.6g} "
                      f"(evaluation {len(evaluations)})", flush=True)
                return True

            returncode = run_following_metrics(runner, trial_dir.name, command, trial_dir, report,
                                               env=trial_env(gpu), echo=len(slots) == 1)
            if runner.interrupted:
                _requeue(study, trial)
                study.stop()
                raise TrialFailed("interrupted")
            if pruned:
                trial.set_user_attr("pruned_at_step", pruned[0])
                raise optuna.TrialPruned()
            try:
                if returncode != 0:
                    raise TrialFailed(f"exit status {returncode} (log: {sweep_dir / trial_dir.name}.log)")
                value = read_metric(trial_dir / "metrics.jsonl", config.metric)
                if not math.isfinite(value):
                    raise TrialFailed(f"{config.metric} is {value}")
            except (TrialFailed, SweepError) as e:
                trial.set_user_attr("error", str(e))
                print(f"[sweep] trial {_number(trial)} failed: {e}", flush=True)
                raise TrialFailed(str(e)) from None
            print(f"[sweep] trial {_number(trial)}: {config.metric}={value:.6g}", flush=True)
            return value

        target = (config.raw.get("metric") or {}).get("target")

        def reached(value: float | None) -> bool:
            """Whether a trial's value reached the metric's target (W&B's: then no more trials start)."""
            return target is not None and value is not None and (
                value <= target if config.goal == "minimize" else value >= target)

        def after_trial(study, trial) -> None:
            write_summary(study, config, sweep_dir)
            if reached(trial.value):
                print(f"[sweep] trial {_number(trial)} reached the metric's target {target}: no more trials",
                      flush=True)
                study.stop()

        remaining = count - _finished(study)
        if any(reached(t.value) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
            print(f"[sweep] a trial reached the metric's target {target} already: no more trials", flush=True)
            remaining = 0
        if remaining > 0:
            study.optimize(objective, n_trials=remaining, catch=(TrialFailed,), callbacks=[after_trial],
                           n_jobs=len(slots))
        if runner.interrupted:
            print("[sweep] interrupted; run the same command again to resume", flush=True)
        write_summary(study, config, sweep_dir)
    return sweep_dir


def write_summary(study, config: SweepConfig, sweep_dir: Path) -> None:
    """Writes summary.md (best parameters and a table), trials.csv, best.json and summary.png."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not study.user_attrs.get(f"interrupted_{t.number}")]
    names = list(config.params)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["trial", "state", config.metric, *names, "pruned_at_step", "error"])
    for t in trials:
        values = t.user_attrs.get("values", t.params)
        writer.writerow([_number(t), t.state.name, "" if t.value is None else t.value,
                         *[format_value(values.get(n, "")) for n in names], t.user_attrs.get("pruned_at_step", ""),
                         t.user_attrs.get("error", "")])
    write_atomic(sweep_dir / "trials.csv", table.getvalue())

    lines = [f"# Sweep `{config.name}`", "", f"program `{config.program}`, method {config.method}, "
             f"{config.goal} `{config.metric}`; {len(complete)} of {len(trials)} trials complete, "
             f"{len(pruned)} pruned (stopped early).", ""]
    if complete:
        best = study.best_trial
        best_values = best.user_attrs.get("values", best.params)
        write_atomic(sweep_dir / "best.json", json.dumps(
            {"trial": _number(best), config.metric: best.value, "params": best_values,
             "command": best.user_attrs.get("command")}, indent=2) + "\n")
        lines += [f"Best: trial {_number(best)}, {config.metric} = {best.value:.6g}", "", "```",
                  shlex.join(render_flags(best_values)), "```", ""]
    lines += ["| trial | state | " + " | ".join([config.metric, *names]) + " |",
              "|---" * (len(names) + 3) + "|"]
    for t in trials:
        values = t.user_attrs.get("values", t.params)
        metric = "" if t.value is None else f"{t.value:.6g}"
        state = f"PRUNED at step {t.user_attrs['pruned_at_step']}" if t in pruned else t.state.name
        lines.append(f"| {_number(t)} | {state} | {metric} | "
                     + " | ".join(_short(values.get(n, "")) for n in names) + " |")
    importances = _importances(study, config, complete)
    if importances:
        lines += ["", "Parameter importance (fANOVA): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in importances.items())]
    write_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    if complete:
        _plot(config, complete, importances, sweep_dir / "summary.png")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


def _importances(study, config: SweepConfig, complete: list) -> dict[str, float]:
    import optuna

    varying = [p.name for p in config.params.values() if p.distribution != "constant"
               and len({format_value(t.params.get(p.name)) for t in complete}) > 1]
    if len(complete) < 3 or not varying:
        return {}
    return optuna.importance.get_param_importances(study, params=varying)


def _plot(config: SweepConfig, complete: list, importances: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(11 if importances else 6, 4), squeeze=False)
    numbers, values = [_number(t) for t in complete], [t.value for t in complete]
    pick = min if config.goal == "minimize" else max
    best_so_far = [pick(values[:i + 1]) for i in range(len(values))]
    ax = axes[0][0]
    ax.scatter(numbers, values, label="trial")
    ax.step(numbers, best_so_far, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=config.metric, title=f"sweep {config.name}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend()
    if importances:
        ax = axes[0][1]
        ax.barh(list(importances)[::-1], list(importances.values())[::-1])
        ax.set(xlabel="importance (fANOVA)", title="parameter importance")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def wandb_trial(run, config: SweepConfig, runner: StageRunner, sweep_dir: Path, gpus: str | None = None) -> int:
    """Runs the trial of W&B run `run` (its config holds the parameters) and logs the program's metrics.jsonl rows
    into the run as they are written, so that W&B's early_terminate sees the metric during the run. A run W&B stops
    stops its trial with a checkpoint. Returns the trial's exit status."""
    values = {name: run.config[name] for name in config.params if name in run.config}
    trial_dir = sweep_dir / f"wandb_{run.id}"
    trial_dir.mkdir(parents=True, exist_ok=True)

    def log(row: dict) -> bool:
        step = row.get("step")
        run.log({k: v for k, v in row.items() if _is_number(v) and k != "step"},
                step=int(step) if _is_number(step) else None)
        return False

    returncode = run_following_metrics(runner, trial_dir.name, build_command(config, values, trial_dir), trial_dir,
                                       log, env=trial_env(gpus))
    run.summary["returncode"] = returncode
    return returncode


@contextmanager
def wandb_errors_in_one_line(what: str) -> Iterator[None]:
    """W&B's own errors (no API key, W&B unreachable, an unknown sweep id) as a SweepError, not their traceback."""
    import wandb

    try:
        yield
    except wandb.errors.Error as e:
        raise SweepError(f"--backend wandb: W&B {what}: {str(e).strip().splitlines()[0]} (--backend optuna runs "
                         "offline)") from None


def choose_backend(backend: str, sweep_id: str | None) -> str:
    """run_sweep's --backend: auto is wandb when W&B is online with an API key, or when --sweep_id names a W&B sweep
    to join; else optuna."""
    if sweep_id and backend == "optuna":
        raise SweepError("--sweep_id joins a W&B sweep: it goes with --backend wandb (or auto), not optuna")
    if backend != "auto":
        return backend
    return "wandb" if sweep_id or wandb_available() else "optuna"


def run_wandb(config: SweepConfig, count: int | None, out_root: Path, gpus: str | None = None,
              project: str | None = None, entity: str | None = None, sweep_id: str | None = None) -> str:
    """Registers the sweep with W&B (or joins `sweep_id`) and runs `count` trials as an agent (`wandb_trial`)."""
    import wandb

    project = project or config.raw.get("project") or "mateconv"
    entity = entity or config.raw.get("entity")
    if sweep_id is None:
        raw = {k: v for k, v in config.raw.items() if k not in ("project", "entity")}
        with wandb_errors_in_one_line("did not register the sweep"):
            sweep_id = wandb.sweep(sweep=raw, project=project, entity=entity)
    slots = trial_gpus(config, gpus)
    if len(slots) > 1:  # W&B's way to use several GPUs: an agent per GPU
        gpus = slots[0]
        print(f"[sweep] a W&B agent runs one trial at a time: this one on GPU {gpus}; for the others start "
              f"`python run_sweep.py --config ... --sweep_id {sweep_id} --gpus N` once per GPU", flush=True)
    sweep_dir = out_root / config.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(sweep_dir)  # built here: signal handlers need the main thread

    def one_trial() -> None:
        if runner.interrupted:
            return
        with wandb.init() as run:
            returncode = wandb_trial(run, config, runner, sweep_dir, gpus)
            if returncode != 0:
                run.finish(exit_code=returncode)

    with wandb_errors_in_one_line(f"did not run an agent of sweep {sweep_id}"):
        wandb.agent(sweep_id, function=one_trial, count=count, project=project, entity=entity)
    return sweep_id
