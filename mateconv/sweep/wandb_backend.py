"""The `wandb` backend: W&B registers the sweep and an agent asks it for each trial's values."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mateconv.procs import StageRunner
from mateconv.sweep.config import SweepConfig, SweepError, SweepInterrupted, is_number
from mateconv.sweep.trials import build_command, run_following_metrics, trial_env, trial_gpus


OFFLINE_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE values that keep W&B off its server


def wandb_available() -> bool:
    """True when W&B can be reached: not in offline/disabled mode and an API key is configured."""
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES:
        return False
    from mateconv.train.tracking import wandb_logged_in

    return wandb_logged_in()


def wandb_trial(run, config: SweepConfig, runner: StageRunner, sweep_dir: Path, gpus: str | None = None) -> int:
    """Runs the trial of W&B run `run` (its config holds the parameters) and logs the program's metrics.jsonl rows
    into the run as they are written, so that W&B's early_terminate sees the metric during the run. A run W&B stops
    stops its trial with a checkpoint. Returns the trial's exit status."""
    values = {name: run.config[name] for name in config.params if name in run.config}
    trial_dir = sweep_dir / f"wandb_{run.id}"
    trial_dir.mkdir(parents=True, exist_ok=True)

    def log(row: dict) -> bool:
        step = row.get("step")
        run.log({k: v for k, v in row.items() if is_number(v) and k != "step"},
                step=int(step) if is_number(step) else None)
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

    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in OFFLINE_MODES:  # else W&B tries its server all the same, and fails on something else
        raise SweepError(f"--backend wandb: a W&B sweep needs W&B's server, and WANDB_MODE is {mode}: unset it (with "
                         "a `wandb login`), or run --backend optuna, which runs offline")
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
    if runner.interrupted:
        raise SweepInterrupted(runner.interrupted)
    return sweep_id
