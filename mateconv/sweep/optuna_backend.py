"""The `optuna` backend: an embedded study in out/sweeps/<name>/study.db (resumable, offline), trials run side by
side on the GPUs given, pruned by W&B's `early_terminate` rule, and a summary with a plot."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import queue
import shlex
from pathlib import Path
from typing import Any

from mateconv.files import save_figure, write_atomic
from mateconv.flags import format_value, render_flags
from mateconv.procs import StageRunner, is_alive
from mateconv.sweep.config import (OPTUNA_DISTRIBUTIONS, REPO, WANDB_ONLY_DISTRIBUTIONS, Param, SweepConfig, SweepError,
                                   SweepInterrupted, is_number)
from mateconv.sweep.trials import (MetricMissing, build_command, exit_reason, read_metric, run_following_metrics,
                                   trial_env, trial_gpus)


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
    # its values: the summary shows what the waiting trial will run with
    resume = {key: trial.user_attrs[key] for key in ("trial_dir", "values") if key in trial.user_attrs}
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
        if p.probabilities:
            raise SweepError(f"parameter '{p.name}': 'probabilities' (weighted values) are supported only by "
                             "--backend wandb; optuna draws each of the values alike")
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

        def interrupted(trial) -> TrialFailed:
            """Queues the trial again for the next start, and starts no other now."""
            _requeue(study, trial)
            study.stop()
            return TrialFailed("interrupted")

        def run_trial(trial, gpu: str | None) -> float:
            values = {name: suggest(trial, p) for name, p in config.params.items()}
            trial_dir = Path(trial.user_attrs.get("trial_dir", sweep_dir / f"trial_{trial.number:04d}"))
            command = build_command(config, values, trial_dir)
            trial.set_user_attr("trial_dir", str(trial_dir))
            trial.set_user_attr("command", command)
            trial.set_user_attr("values", values)
            if runner.interrupted:  # a Ctrl-C between two trials: this one waits for the next start
                raise interrupted(trial)
            trial_dir.mkdir(parents=True, exist_ok=True)
            where = f" on GPU {gpu} (log: {sweep_dir / trial_dir.name}.log)" if len(slots) > 1 else ""
            print(f"[sweep] trial {_number(trial)} ({_finished(study) + 1}/{count}){where}: "
                  + " ".join(f"{k}={format_value(v)}" for k, v in values.items()), flush=True)
            evaluations = []  # (step, value) of each value of the metric, reported as Optuna step 1, 2, ...
            pruned = []

            def report(row: dict) -> bool:
                if not is_number(row.get(config.metric)):
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
                raise interrupted(trial)
            if pruned:
                trial.set_user_attr("pruned_at_step", pruned[0])
                raise optuna.TrialPruned()
            try:
                if returncode != 0:
                    log = sweep_dir / f"{trial_dir.name}.log"
                    raise TrialFailed(f"{exit_reason(returncode, log)} (log: {log})")
                value = read_metric(trial_dir / "metrics.jsonl", config.metric)
                if not math.isfinite(value):
                    raise TrialFailed(f"{config.metric} is {value}")
            except MetricMissing as e:  # a trial that ran to its end without it: a misspelt metric.name
                trial.set_user_attr("error", str(e))
                raise SweepError(f"trial {_number(trial)}: {e}; every trial would fail the same way, so no more "
                                 f"start: fix metric.name, then delete {sweep_dir} (its study is scored by the old "
                                 f"name) or give the sweep a new name") from None
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
        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            best = study.best_trial
            print(f"[sweep] best: trial {_number(best)}, {config.metric}={best.value:.6g}: {_command(best)}",
                  flush=True)
    if runner.interrupted:
        raise SweepInterrupted(runner.interrupted)
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
        lines += [f"Best: trial {_number(best)}, {config.metric} = {best.value:.6g}; its command (another `--out_dir` "
                  "trains it again):", "", "```", _command(best), "```", ""]
    lines += ["| trial | state | " + " | ".join([config.metric, *names]) + " |",
              "|---" * (len(names) + 3) + "|"]
    for t in trials:
        values = t.user_attrs.get("values", t.params)
        metric = "" if t.value is None else f"{t.value:.6g}"
        state = f"PRUNED at step {t.user_attrs['pruned_at_step']}" if t in pruned else t.state.name
        lines.append(f"| {_number(t)} | {state} | {metric} | "
                     + " | ".join(_short(values.get(n, "")) for n in names) + " |")
    failed = [t for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
    if failed:
        lines += ["", "Failed trials:", *(f"- trial {_number(t)}: {t.user_attrs['error']}" for t in failed)]
    importances = _importances(study, config, complete)
    if importances:
        lines += ["", "Parameter importance (fANOVA): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in importances.items())]
    write_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    if complete:
        _plot(config, complete, importances, sweep_dir / "summary.png")


def _command(trial) -> str:
    """A trial's command line, ready to paste (a study from before commands were kept: its flags)."""
    return shlex.join(trial.user_attrs.get("command") or render_flags(trial.user_attrs.get("values", trial.params)))


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
