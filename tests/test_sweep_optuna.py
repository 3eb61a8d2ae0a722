"""A real offline Optuna sweep over a tiny program that writes metrics.jsonl: trials, summary, resume, failures."""
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from mateconv.sweep.config import SweepError, SweepInterrupted, load_sweep_config
from mateconv.sweep.optuna_backend import run_optuna

REPO = Path(__file__).resolve().parents[1]

# The program parses flags the way a sweep agent sends them (`--key value` and `--key=value`), appends its
# arguments to calls.jsonl, and writes a metric that depends on the swept values.
PROGRAM = '''
import argparse, json, math, os, signal, sys, time
interrupted = []
if os.environ.get("WAIT_FOR_SIGINT") == "1":
    signal.signal(signal.SIGINT, lambda *a: interrupted.append(1))
parser = argparse.ArgumentParser()
parser.add_argument("--learning_rate", type=float, required=True)
parser.add_argument("--use_moe", nargs="?", const="true", choices=("true", "false"), required=True)
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--out_dir", required=True)
args = parser.parse_args()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl"), "a") as f:
    f.write(json.dumps(vars(args)) + "\\n")
if os.environ.get("WAIT_FOR_SIGINT") == "1":
    deadline = time.time() + 30
    while not interrupted and time.time() < deadline:
        time.sleep(0.05)
    sys.exit(0)  # like the engine: save a checkpoint and leave cleanly
if args.learning_rate > float(os.environ.get("FAIL_ABOVE_LR", "inf")):
    sys.exit("diverged")
if args.learning_rate > float(os.environ.get("KILL_ABOVE_LR", "inf")):
    print("step 1/3 loss 4.2", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer does
os.makedirs(args.out_dir, exist_ok=True)
started = time.time()
time.sleep(float(os.environ.get("TRIAL_SECONDS", "0")))
with open(os.path.join(args.out_dir, "span.json"), "w") as f:
    json.dump({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": started, "end": time.time()}, f)
target = (math.log10(args.learning_rate) + 3.5) ** 2 + (0.0 if args.use_moe == "true" else 0.25)
with open(os.path.join(args.out_dir, "metrics.jsonl"), "w") as f:
    for step in range(1, 4):
        f.write(json.dumps({"step": step, "loss": target + 1 / step}) + "\\n")
        f.write(json.dumps({"step": step, "val_loss": target + 0.5 / step}) + "\\n")
'''


def _write_sweep(tmp_path: Path, method: str = "random", learning_rate: dict | None = None) -> Path:
    (tmp_path / "program.py").write_text(PROGRAM)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "program": str(tmp_path / "program.py"), "method": method,
        "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": {"learning_rate": learning_rate or {"distribution": "log_uniform_values", "min": 1e-5,
                                                          "max": 1e-2},
                       "use_moe": {"values": [True, False]}, "epochs": {"value": 2}}}))
    return path


def _calls(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def _expected(call: dict) -> float:
    return (math.log10(call["learning_rate"]) + 3.5) ** 2 + (0.0 if call["use_moe"] == "true" else 0.25) + 0.5 / 3


def test_run_cap_caps_the_trials(tmp_path):
    """W&B's `run_cap` (a key the config accepts) was ignored by the Optuna backend: `--count 5` ran 5 trials over a
    cap of 2, and without --count a random sweep was refused for want of one."""
    path = _write_sweep(tmp_path)
    path.write_text(path.read_text() + "run_cap: 2\n")
    run_optuna(load_sweep_config(path), count=None, out_root=tmp_path / "sweeps")
    run_optuna(load_sweep_config(path), count=5, out_root=tmp_path / "sweeps")
    assert len(_calls(tmp_path)) == 2


def test_a_trial_that_reaches_the_metric_target_ends_the_sweep(tmp_path):
    """W&B's `metric.target` (accepted by the config) was ignored by the Optuna backend: it ran all --count trials."""
    path = _write_sweep(tmp_path)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "metric": {**raw["metric"], "target": 100.0}}))  # every trial is below
    run_optuna(load_sweep_config(path), count=3, out_root=tmp_path / "sweeps")
    run_optuna(load_sweep_config(path), count=3, out_root=tmp_path / "sweeps")  # a rerun: reached already
    assert len(_calls(tmp_path)) == 1


def test_a_changed_sweep_config_does_not_resume_the_old_study(tmp_path):
    """Rerunning a sweep after editing its search space (or its goal) went on with the stored study: new trials
    mixed with old ones in one summary, and a goal turned to maximize was silently kept at minimize."""
    path = _write_sweep(tmp_path)
    sweep_dir = run_optuna(load_sweep_config(path), count=1, out_root=tmp_path / "sweeps")
    for edit in ({"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}},
                 {"metric": {"name": "val_loss", "goal": "maximize"}}):
        raw = yaml.safe_load(path.read_text())
        changed = tmp_path / "changed.yaml"  # the same name: tiny
        changed.write_text(yaml.safe_dump({**raw, "parameters": {**raw["parameters"], **edit}} if "learning_rate"
                                          in edit else {**raw, **edit}))
        with pytest.raises(SweepError, match=f"^{sweep_dir}: the sweep config changed since study 'tiny' started "
                                             "there \\(program, command, method, metric or parameters\\): "):
            run_optuna(load_sweep_config(changed), count=2, out_root=tmp_path / "sweeps")
    assert len(_calls(tmp_path)) == 1
    run_optuna(load_sweep_config(path), count=2, out_root=tmp_path / "sweeps")  # unchanged: it resumes
    assert len(_calls(tmp_path)) == 2


def test_offline_sweep_runs_summarises_and_resumes(tmp_path, capsys):
    config = load_sweep_config(_write_sweep(tmp_path))
    sweep_dir = run_optuna(config, count=3, out_root=tmp_path / "sweeps")
    output = capsys.readouterr().out
    calls = _calls(tmp_path)
    assert len(calls) == 3 and all(c["epochs"] == 2 for c in calls)
    assert [Path(c["out_dir"]).name for c in calls] == ["trial_0000", "trial_0001", "trial_0002"]

    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3
    for row, call in zip(rows, calls):
        assert math.isclose(float(row["val_loss"]), _expected(call))  # the last val_loss of each trial
        assert math.isclose(float(row["learning_rate"]), call["learning_rate"])
        assert row["use_moe"] == call["use_moe"]
    best = json.loads((sweep_dir / "best.json").read_text())
    assert math.isclose(best["val_loss"], min(_expected(c) for c in calls))
    assert best["command"][-2:] == ["--out_dir", str(sweep_dir / f"trial_{best['trial']:04d}")]
    summary = (sweep_dir / "summary.md").read_text()
    assert f"Best: trial {best['trial']}" in summary and "| trial | state | val_loss |" in summary
    # how to train the best again: its whole command, in the summary and at the end of the run
    assert f"\n{shlex.join(best['command'])}\n" in summary
    assert f"[sweep] best: trial {best['trial']}, val_loss={best['val_loss']:.6g}: {shlex.join(best['command'])}\n" \
        in output
    assert (sweep_dir / "summary.png").stat().st_size > 1000
    assert not (sweep_dir / "sweep.pid").exists()

    # Resuming with a larger count runs only the missing trials, in the same study.
    run_optuna(config, count=4, out_root=tmp_path / "sweeps")
    calls = _calls(tmp_path)
    assert len(calls) == 4
    assert calls[3]["learning_rate"] not in [c["learning_rate"] for c in calls[:3]]  # no replayed random draws
    assert len(list(csv.DictReader((sweep_dir / "trials.csv").open()))) == 4


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    config = load_sweep_config(_write_sweep(tmp_path, method="grid", learning_rate={"values": [1e-4, 5e-3]}))
    monkeypatch.setenv("FAIL_ABOVE_LR", "1e-3")
    sweep_dir = run_optuna(config, count=None, out_root=tmp_path / "sweeps")
    assert len(_calls(tmp_path)) == 4  # the whole 2 x 2 grid, each point once
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    states = {(float(r["learning_rate"]), r["use_moe"]): r["state"] for r in rows}
    assert states == {(1e-4, "true"): "COMPLETE", (1e-4, "false"): "COMPLETE",
                      (5e-3, "true"): "FAIL", (5e-3, "false"): "FAIL"}
    # why, as the program said it last (with --gpus its output goes only to its log), in the table and the summary
    failed = {r["trial"]: r["error"] for r in rows if r["state"] == "FAIL"}
    assert all(error.startswith("exit status 1: diverged (log: ") for error in failed.values()), failed
    summary = (sweep_dir / "summary.md").read_text()
    assert all(f"- trial {trial}: {error}\n" in summary for trial, error in failed.items()), summary
    assert (sweep_dir / "trial_0000.log").is_file()


def test_a_misspelt_metric_stops_the_sweep_after_the_first_trial(tmp_path):
    """`metric: {name: val_los}` ran every trial to its end and failed each one the same way (no such metric)."""
    path = _write_sweep(tmp_path)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "metric": {"name": "val_los", "goal": "minimize"}}))
    with pytest.raises(SweepError, match="has no 'val_los' values .*did you mean 'val_loss'\\?.*every trial would"):
        run_optuna(load_sweep_config(path), count=3, out_root=tmp_path / "sweeps")
    assert len(_calls(tmp_path)) == 1


def test_weighted_values_are_refused_by_the_optuna_backend(tmp_path):
    """W&B's `probabilities` beside `values` were ignored: asked for 90% MoE trials, the sweep drew half of each."""
    path = _write_sweep(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["parameters"]["use_moe"]["probabilities"] = [0.9, 0.1]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepError, match="^parameter 'use_moe': 'probabilities' .* only by --backend wandb"):
        run_optuna(load_sweep_config(path), count=2, out_root=tmp_path / "sweeps")
    assert not (tmp_path / "calls.jsonl").exists()


def test_a_trial_killed_by_a_signal_says_so(tmp_path, monkeypatch):
    """A trial the OOM killer ended was 'exit status -9' with its last progress line as the reason."""
    config = load_sweep_config(_write_sweep(tmp_path, method="grid", learning_rate={"values": [5e-3]}))
    monkeypatch.setenv("KILL_ABOVE_LR", "1e-3")
    sweep_dir = run_optuna(config, count=1, out_root=tmp_path / "sweeps")
    error = next(csv.DictReader((sweep_dir / "trials.csv").open()))["error"]
    assert error.startswith("killed by SIGKILL (the kernel's out-of-memory killer, or kill -9) (log: "), error


def test_trial_left_running_by_a_killed_runner_is_rerun(tmp_path):
    config = load_sweep_config(_write_sweep(tmp_path))
    sweep_dir = tmp_path / "sweeps" / "tiny"
    sweep_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    study.enqueue_trial({"learning_rate": 2e-4, "use_moe": False})
    killed = study.ask()
    killed.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
    killed.suggest_categorical("use_moe", [True, False])
    killed.set_user_attr("trial_dir", str(sweep_dir / "trial_0000"))  # never told: what a killed runner leaves

    run_optuna(config, count=2, out_root=tmp_path / "sweeps")
    calls = _calls(tmp_path)
    assert len(calls) == 2
    assert calls[0]["learning_rate"] == 2e-4 and calls[0]["use_moe"] == "false"
    assert calls[0]["out_dir"] == str(sweep_dir / "trial_0000")  # rerun in its own dir: the stage resumes there
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]  # the interrupted trial is not listed
    # Each trial is named by its directory and log, the rerun by its first run's (it was Optuna's new number, 1,
    # and the summary's best trial could name a trial_0001 that does not exist)
    assert [r["trial"] for r in rows] == ["0", "2"]
    best = json.loads((sweep_dir / "best.json").read_text())["trial"]
    assert (sweep_dir / f"trial_{best:04d}" / "metrics.jsonl").is_file()
    assert f"Best: trial {best}," in (sweep_dir / "summary.md").read_text()


def test_cli_runs_offline_by_default(tmp_path):
    path = _write_sweep(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO / "run_sweep.py"), "--config", str(path), "--count", "2",
                             "--out_dir", str(tmp_path / "sweeps")], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[sweep] summary:" in result.stdout and len(_calls(tmp_path)) == 2


def test_sigint_stops_the_sweep_and_the_interrupted_trial_reruns(tmp_path):
    path = _write_sweep(tmp_path)
    command = [sys.executable, str(REPO / "run_sweep.py"), "--config", str(path), "--count", "2", "--backend",
               "optuna", "--out_dir", str(tmp_path / "sweeps")]
    sweep = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "WAIT_FOR_SIGINT": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "calls.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    sweep.send_signal(signal.SIGINT)
    output = sweep.communicate(timeout=60)[0]
    # 130, as a shell reports a program Ctrl-C ended (it was 0: `run_sweep.py && next` went on)
    assert sweep.returncode == 128 + signal.SIGINT and "interrupted; run the same command again to resume" in output
    assert "Traceback" not in output
    first = _calls(tmp_path)[0]

    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    calls = _calls(tmp_path)
    assert len(calls) == 3  # the interrupted call, its rerun, one new trial
    assert (calls[1]["learning_rate"], calls[1]["use_moe"]) == (first["learning_rate"], first["use_moe"])
    assert calls[1]["out_dir"] == first["out_dir"] and calls[2]["out_dir"] != first["out_dir"]
    rows = list(csv.DictReader((tmp_path / "sweeps" / "tiny" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]


def test_sigint_between_two_trials_starts_no_other(tmp_path, monkeypatch):
    """A Ctrl-C while the summary of a finished trial was written (between two trials) ran the next trial to its end,
    then threw its result away to rerun it on the next start."""
    from mateconv.sweep import optuna_backend

    real_write_summary, summaries = optuna_backend.write_summary, []

    def summary_then_ctrl_c(*args):
        real_write_summary(*args)
        summaries.append(1)
        if len(summaries) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(optuna_backend, "write_summary", summary_then_ctrl_c)
    path = _write_sweep(tmp_path)
    try:
        with pytest.raises(SweepInterrupted):
            run_optuna(load_sweep_config(path), count=3, out_root=tmp_path / "sweeps")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert len(_calls(tmp_path)) == 1
    # the trial left for the next start shows the values it will run with
    waiting = list(csv.DictReader((tmp_path / "sweeps" / "tiny" / "trials.csv").open()))[-1]
    assert waiting["state"] == "WAITING" and float(waiting["learning_rate"]) > 0 and waiting["use_moe"]
    monkeypatch.undo()
    run_optuna(load_sweep_config(path), count=3, out_root=tmp_path / "sweeps")
    rows = list(csv.DictReader((tmp_path / "sweeps" / "tiny" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 and len(_calls(tmp_path)) == 3


def test_gpus_run_one_trial_on_each_at_once(tmp_path, monkeypatch, capsys):
    """Seed 000's `--count 3 --gpu 0,1` with 4 trials: two run at once, each with one GPU of the list as
    CUDA_VISIBLE_DEVICES (a program uses one device; before, GPU 1 stayed idle); each trial's output goes to its
    log, and the sweep's count and summary are as with one GPU."""
    monkeypatch.setenv("TRIAL_SECONDS", "3")
    config = load_sweep_config(_write_sweep(tmp_path))
    sweep_dir = run_optuna(config, count=4, out_root=tmp_path / "sweeps", gpus="0,1")
    spans = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("trial_*/span.json"))]
    assert len(spans) == 4 and sorted(span["gpu"] for span in spans) == ["0", "0", "1", "1"]
    overlapping = [(a, b) for a in spans for b in spans
                   if a is not b and a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping and all(a["gpu"] != b["gpu"] for a, b in overlapping)
    out = capsys.readouterr().out
    assert out.count(" on GPU ") == 4 and "val_loss" not in out.split("[sweep]")[0]
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert [row["state"] for row in rows] == ["COMPLETE"] * 4
