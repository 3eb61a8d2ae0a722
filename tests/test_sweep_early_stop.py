"""Early termination: W&B's `early_terminate` as Optuna's HyperbandPruner, a real sweep of the tiny pretrain stage
that prunes a bad trial with a checkpoint, and the W&B backend logging a running trial's rows into an offline run and
stopping the trial when W&B stops the run."""
import csv
import json
import threading
import time
from pathlib import Path

import optuna
import pytest
import wandb
import yaml
from wandb.agents.pyagent import _terminate_thread

from mateconv.files import read_metrics
from mateconv.procs import StageRunner
from mateconv.sweep.config import SweepError, load_sweep_config, parse_sweep_config
from mateconv.sweep.optuna_backend import make_pruner, run_optuna
from mateconv.sweep.trials import POLL_S
from mateconv.sweep.wandb_backend import wandb_trial
from mateconv.train.checkpoint import step_name
from tests.test_sweep_pretrain import _write_pretrain_shards
from tests.wandb_records import history_rows

REPO = Path(__file__).resolve().parents[1]


def _config(early_terminate) -> dict:
    return {"program": "train.py", "method": "random", "metric": {"name": "val_loss", "goal": "minimize"},
            "parameters": {"learning_rate": {"min": 1e-4, "max": 1e-2}}, "early_terminate": early_terminate}


@pytest.mark.parametrize("early_terminate, min_resource, max_resource, reduction_factor", [
    ({"type": "hyperband", "min_iter": 3}, 3, "auto", 3),
    ({"type": "hyperband", "min_iter": 2, "eta": 2, "strict": True}, 2, "auto", 2),
    ({"type": "hyperband", "max_iter": 27, "s": 2}, 3, 27, 3),  # W&B's lowest band: 27 / 3^2
    ({"type": "hyperband", "max_iter": 10, "s": 3, "eta": 4}, 1, 10, 4),
])
def test_early_terminate_becomes_a_hyperband_pruner(early_terminate, min_resource, max_resource, reduction_factor):
    pruner = make_pruner(parse_sweep_config(_config(early_terminate)))
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (
        min_resource, max_resource, reduction_factor)


def test_no_early_terminate_prunes_nothing():
    raw = _config(None)
    del raw["early_terminate"]
    assert isinstance(make_pruner(parse_sweep_config(raw)), optuna.pruners.NopPruner)


@pytest.mark.parametrize("early_terminate, message", [
    ({"type": "median", "min_iter": 3}, "type must be hyperband"),
    ({"type": "hyperband"}, "give min_iter, or max_iter and s"),
    ({"type": "hyperband", "max_iter": 9}, "give min_iter, or max_iter and s"),
    ({"type": "hyperband", "min_itr": 3}, "unknown key 'min_itr'; did you mean 'min_iter'?"),
    ({"type": "hyperband", "min_iter": 0}, "min_iter must be a positive integer"),
    ({"type": "hyperband", "min_iter": 3, "eta": 1}, "eta must be a number above 1"),
    ("hyperband", "expected a mapping"),
])
def test_invalid_early_terminate_names_the_problem(early_terminate, message):
    with pytest.raises(SweepError, match=message):
        parse_sweep_config(_config(early_terminate))


def test_fractional_eta_is_refused_by_optuna_only():
    config = parse_sweep_config(_config({"type": "hyperband", "min_iter": 3, "eta": 2.5}))  # valid for W&B
    with pytest.raises(SweepError, match="integer eta"):
        make_pruner(config)


def test_shipped_seed_sweeps_terminate_early():
    for name in ("sweep_config.yaml", "sweep_config_dpo.yaml"):
        config = load_sweep_config(REPO / name)
        evaluations = config.params["max_steps"].value // config.params["eval_interval"].value
        pruner = make_pruner(config)
        # the first rung comes well before the end of a trial
        assert isinstance(pruner, optuna.pruners.HyperbandPruner) and pruner._min_resource * 3 <= evaluations, name


def _tiny_pretrain(tmp_path: Path, max_steps: int) -> dict:
    """Constant flags of a tiny pretrain run that evaluates every 20 steps on shards it learns within ~100 steps."""
    _write_pretrain_shards(tmp_path / "tokens" / "train", 8192)
    _write_pretrain_shards(tmp_path / "tokens" / "val", 1024)
    return {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "max_seq_len": 32,
            "batch_size": 8, "max_steps": max_steps, "log_interval": 10, "eval_interval": 20, "eval_batches": 1,
            "num_workers": 0, "tracker": "none", "device": "cpu", "data_path": str(tmp_path / "tokens" / "train"),
            "val_data_path": str(tmp_path / "tokens" / "val")}


def _steps(trial_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(trial_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_optuna_sweep_prunes_a_bad_trial_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    max_steps = 400
    path = tmp_path / "early.yaml"
    path.write_text(yaml.safe_dump({
        "name": "early", "program": str(REPO / "4.pretrain.py"), "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"},
        # one bracket (max_iter / min_iter < eta), so both trials meet at the rung of the 2nd evaluation (step 40)
        "early_terminate": {"type": "hyperband", "min_iter": 2, "max_iter": 4, "eta": 3},
        "parameters": {"learning_rate": {"values": [3e-3, 1e-6]},
                       **{k: {"value": v} for k, v in _tiny_pretrain(tmp_path, max_steps).items()}}}))

    # seed 1: the grid runs the learning trial first; the one that barely moves meets it at the rung
    sweep_dir = run_optuna(load_sweep_config(path), count=None, out_root=tmp_path / "sweeps", seed=1)
    run_optuna(load_sweep_config(path), count=None, out_root=tmp_path / "sweeps")  # resumed: nothing left to run

    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert [(r["learning_rate"], r["state"]) for r in rows] == [("0.003", "COMPLETE"), ("1e-06", "PRUNED")], \
        (sweep_dir / "trial_0001.log").read_text()[-2000:]
    good, bad = sweep_dir / "trial_0000", sweep_dir / "trial_0001"
    assert _steps(good)[-1] == max_steps and (good / "final" / "config.json").is_file()

    stopped_at = _steps(bad)[-1]
    assert int(rows[1]["pruned_at_step"]) == 40 < stopped_at < max_steps  # stopped at the next step it checked
    assert (bad / "checkpoints" / step_name(stopped_at)).is_dir() and not (bad / "final").exists()
    assert not (bad / "STOP").exists()  # the stage honoured and removed it
    study = optuna.load_study(study_name="early", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert "1 of 2 trials complete, 1 pruned" in (sweep_dir / "summary.md").read_text()
    assert "[sweep] trial 1 pruned at step 40: val_loss=" in capsys.readouterr().out
    assert json.loads((sweep_dir / "best.json").read_text())["trial"] == 0


@pytest.mark.slow
def test_wandb_trial_logs_rows_while_running_and_stops_with_the_run(tmp_path, monkeypatch):
    """W&B's agent stops a run by raising an exception in the thread running it (`_terminate_thread`), as here; the
    stop decision itself needs the W&B server, so the run is offline and the test takes that decision."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    max_steps = 2000
    constants = _tiny_pretrain(tmp_path, max_steps)
    config = parse_sweep_config({"program": str(REPO / "4.pretrain.py"), "method": "random",
                                 "metric": {"name": "val_loss", "goal": "minimize"},
                                 "parameters": {"learning_rate": {"values": [3e-3]},
                                                **{k: {"value": v} for k, v in constants.items()}}})
    sweep_dir = tmp_path / "sweeps" / "wandb"
    runner = StageRunner(sweep_dir)
    run = wandb.init(dir=tmp_path, mode="offline", config={"learning_rate": 3e-3, **constants})
    trial_dir = sweep_dir / f"wandb_{run.id}"
    raised = []

    def agent_thread():
        try:
            wandb_trial(run, config, runner, sweep_dir)
        except Exception as error:
            raised.append(error)

    thread = threading.Thread(target=agent_thread)
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline and sum("val_loss" in row for row in _rows(trial_dir)) < 2:
        time.sleep(0.05)
    time.sleep(2 * POLL_S)  # the trial's thread has read those rows and logged them
    _terminate_thread(thread)
    thread.join(60)
    run.finish()
    wandb.teardown()

    assert not thread.is_alive() and len(raised) == 1
    metrics = _rows(trial_dir)
    stopped_at = metrics[-1]["step"]
    assert 40 <= stopped_at < max_steps and (trial_dir / "checkpoints" / step_name(stopped_at)).is_dir()
    assert not runner.children  # the trial was waited for, not left running

    history = history_rows(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    logged = [(row["_step"], row["val_loss"]) for row in history if "val_loss" in row]
    written = [(row["step"], row["val_loss"]) for row in metrics if "val_loss" in row]
    assert logged and logged == written[:len(logged)]
    # the first rows reached W&B while the trial was still training
    assert history[0]["_timestamp"] < metrics[-1]["time"]


def _rows(trial_dir: Path) -> list[dict]:
    path = trial_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []
