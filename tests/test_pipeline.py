"""The end-to-end run (scripts/run_pipeline.sh, preset tiny), what DPO did in it, and its operations: nohup launch,
stop.sh, resume."""
from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

import pytest
from conftest import run_script

from mateconv.chat import load_model
from mateconv.config import DPOConfig
from mateconv.data.shards import DPOTokens
from mateconv.evaluate.metrics import task_accuracy
from mateconv.files import read_metrics
from mateconv.pipeline import REPO, PipelineError, apply_sets, build_stages, launcher, load_preset, main
from mateconv.train.dpo import DPOObjective
from mateconv.train.evaluators import preference_eval

DATA_STAGES = "data,tokenizer,prepare,tokens"
STAGES = ["data", "tokenizer", "prepare", "tokens", "pretrain", "sft", "prefs", "prefs_val", "prefs_tokens",
          "prefs_val_tokens", "dpo", "eval"]


def test_preset_sets_and_flags():
    preset = load_preset("tiny")
    apply_sets(preset, ["pretrain.max_steps=7", "pretrain.use_moe=true"])
    stages = {stage.name: stage for stage in build_stages(preset, Path("out").resolve())}
    assert list(stages) == STAGES
    command = stages["pretrain"].command
    assert command[command.index("--max_steps") + 1] == "7" and "--use_moe" in command
    with pytest.raises(PipelineError, match="unknown stage 'pretrian'"):
        apply_sets(preset, ["pretrian.max_steps=1"])
    with pytest.raises(PipelineError, match="unknown preset"):
        load_preset("nonexistent")


def test_the_launcher_takes_the_gpus_cuda_visible_devices_lists(monkeypatch):
    """With CUDA_VISIBLE_DEVICES=2,3 (the free GPUs of a shared box) `deepspeed --num_gpus=2` trained on GPUs 0 and 1:
    the launcher drops the variable when it is given --num_gpus."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,5")
    assert launcher({"num_gpus": 2}, "4.pretrain.py")[1:] == ["--include=localhost:2,3", str(REPO / "4.pretrain.py")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2c1e")  # a UUID: the launcher's --include takes indices only
    assert launcher({"num_gpus": 2}, "4.pretrain.py")[1] == "--num_gpus=2"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launcher({"num_gpus": 2}, "4.pretrain.py")[1] == "--num_gpus=2"
    assert launcher({}, "4.pretrain.py")[1:] == [str(REPO / "4.pretrain.py")]


def test_a_preset_key_given_twice_names_its_line(tmp_path):
    """A second `pretrain:` under stages silently replaced the first (PyYAML keeps the last)."""
    path = tmp_path / "twice.yaml"
    path.write_text("extends: tiny\nstages:\n  pretrain: {args: {max_steps: 5}}\n  pretrain: {args: {epochs: 2}}\n")
    with pytest.raises(PipelineError, match=f"^{path}:4: not valid YAML: key 'pretrain' is given twice"):
        load_preset(str(path))


@pytest.mark.parametrize("setting, message", [
    ("pretrain.learning_rat=1", "pretrain: unknown config key 'learning_rat'; did you mean 'learning_rate'?"),
    ("dpo.dpo_beta=-1", "dpo: dpo_beta must be > 0, got -1.0"),
    ("prefs.n_promts=5", "prefs: unrecognized argument --n_promts; did you mean --n_prompts?"),
    ("prefs_tokens.workers=x", "prefs_tokens: argument --workers: invalid int value: 'x'"),
    ("eval.max_tasks=abc", "eval: argument --max_tasks: invalid int value: 'abc'"),
])
def test_a_flag_error_in_any_later_stage_stops_the_run_before_anything_runs(setting, message, tmp_path, monkeypatch,
                                                                             capsys):
    """The training stages' flags are parsed by their own config parser and the later stages' by their argparse
    parsers before the first stage starts: a typo in DPO's or the evaluation's flags is not found hours later."""
    monkeypatch.chdir(tmp_path)
    assert main(["--set", setting, "--logs", str(tmp_path / "logs")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.strip().endswith("(nothing was run)"), error
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_a_flag_error_in_a_stage_only_leaves_out_stops_the_run_too(tmp_path, monkeypatch, capsys):
    """`--only data --set pretrain.max_stepz=3` ran the data stage and said nothing of the typo: only the stages that
    run had their flags checked, while the docs say every stage's are."""
    monkeypatch.chdir(tmp_path)
    assert main(["--only", "data", "--set", "pretrain.max_stepz=3", "--logs", str(tmp_path / "logs")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: pretrain: unknown config key 'max_stepz'") and "(nothing was run)" in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["mateconv.pipeline", "mateconv.data.embedded", "mateconv.tokenizer",
                                    "mateconv.data.prepare"])
def test_usage_names_the_command_the_docs_give(module, capsys):
    """A wrong flag printed `usage: pipeline.py ...` and `pipeline.py: error: ...`, a name no command line uses."""
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--bogus"])
    error = capsys.readouterr().err
    assert error.startswith(f"usage: python -m {module} [-h]") and f"python -m {module}: error: " in error


@pytest.mark.parametrize("sets, message", [
    (["--set", "eval.max_tasks=3", "pretrain.learning_rat=1"], "pretrain: unknown config key 'learning_rat'"),
    (["--set", "pretrain.max_steps=5", "--set", "eval.max_tasks=3", "dpo.dpo_beta=-1"], "dpo: dpo_beta must be > 0"),
])
def test_set_takes_several_values(sets, message, tmp_path, monkeypatch, capsys):
    """`--set a=1 b=2`, as a stage's own `--overrides key=value ...` takes them (argparse refused the second value
    as the pipeline command), and repeated `--set`s: every value reaches its stage (its error shows it)."""
    monkeypatch.chdir(tmp_path)
    assert main([*sets, "--logs", str(tmp_path / "logs")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tiny_pipeline):
    root, result = tiny_pipeline
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = root / "out"
    for artifact in ["tokenizer/tokenizer.json", "data/stats.json", "tokens/pretrain/train/index.json",
                     "tokens/sft/train/index.json", "pretrain/final/model.safetensors", "sft/final/model.safetensors",
                     "prefs/dpo_pairs.jsonl", "prefs_val/dpo_pairs.jsonl", "tokens/prefs/train/index.json",
                     "tokens/prefs/val/index.json", "dpo/final/model.safetensors", "dpo/forgetting.png",
                     "eval/summary.md", "eval/summary.json", "eval/metrics.png", "pipeline_timings.json"]:
        assert (out / artifact).exists(), artifact
    assert set(json.loads((out / "pipeline_timings.json").read_text())) == set(STAGES)
    pairs = [json.loads(line) for line in (out / "prefs/dpo_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 100 and all({"prompt", "chosen", "rejected"} <= set(pair) for pair in pairs)

    # the eval stage's own report (all held-out tasks); the next test measures DPO's effect itself
    accuracy = {Path(m["path"]).parent.name: m["task_accuracy"]
                for m in json.loads((out / "eval/summary.json").read_text())["models"]}
    assert accuracy["dpo"] > accuracy["sft"] > accuracy["pretrain"], accuracy

    again = run_script("run_pipeline.sh", cwd=root, timeout=300)  # everything is done: every stage is skipped
    assert again.returncode == 0 and again.stdout.count("skipped") == len(STAGES), again.stdout[-2000:]
    assert "finished after it" not in again.stdout
    os.utime(out / "dpo/final/config.json")  # DPO trained again after the evaluation: the skipped stage says so
    stale = run_script("run_pipeline.sh", "--only", "eval", cwd=root, timeout=300)
    assert ("[pipeline] eval: note: dpo finished after it; remove out/eval/summary.json to run it again on them"
            in stale.stdout), stale.stdout
    # --set on a finished stage: a typo is still an error, a new value says it changes nothing there
    typo = run_script("run_pipeline.sh", "--only", "pretrain", "--set", "pretrain.n_layer=3", cwd=root, timeout=300)
    assert typo.returncode == 2 and "pretrain: unknown config key 'n_layer'; did you mean 'n_layers'?" in typo.stderr
    more = run_script("run_pipeline.sh", "--only", "pretrain", "--set", "pretrain.max_steps=30", cwd=root,
                      timeout=300)
    assert more.returncode == 0, more.stdout
    assert ("[pipeline] pretrain: pretrain.max_steps=30 changes nothing in a finished stage (done while "
            "out/pretrain/final/config.json exists: remove it") in more.stdout, more.stdout


def load(path):
    return load_model(path, device="cpu", dtype="float32")


@pytest.mark.slow
def test_dpo_after_sft_improves_held_out_preferences_and_tasks(tiny_pipeline):
    """DPO after SFT on the embedded verifiable data set, as the main command runs it: on prompts DPO never trained
    on, the reward accuracy is well above chance and greedy task accuracy goes up; the forgetting curves (held-out
    pretraining/SFT perplexity) are logged and plotted."""
    root, result = tiny_pipeline
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = root / "out"
    sft, tokenizer = load(out / "sft/final")
    dpo, _ = load(out / "dpo/final")
    train_prompts = {json.loads(line)["id"] for line in (out / "prefs/dpo_pairs.jsonl").read_text().splitlines()}
    held_out_prompts = {json.loads(line)["id"] for line in (out / "prefs_val/dpo_pairs.jsonl").read_text().splitlines()}
    assert len(held_out_prompts) >= 80 and not train_prompts & held_out_prompts

    # Reward accuracy against the SFT reference, which ranks every pair as a tie (rewards 0, accuracy 0).
    # On-policy held-out pairs: the SFT model's own right and wrong replies to validation prompts.
    objective = DPOObjective(DPOConfig(beta=0.1), reference=sft)
    on_policy = preference_eval(dpo, objective, DPOTokens(out / "tokens/prefs/val", 128), 16, "cpu")
    assert on_policy["rewards/accuracies"] > 0.65 and on_policy["rewards/margins"] > 0, on_policy
    # The embedded data set's own held-out pairs (a known answer against a generated wrong one): another distribution.
    written = preference_eval(dpo, objective, DPOTokens(out / "tokens/dpo/val", 128), 16, "cpu")
    assert written["rewards/accuracies"] > 0.55, written  # measured 0.591

    tasks = [json.loads(line) for line in (out / "data/tasks_val.jsonl").read_text().splitlines()]
    before = task_accuracy(sft, tokenizer, tasks, max_new_tokens=24)
    after = task_accuracy(dpo, tokenizer, tasks, max_new_tokens=24)
    fixed = sum(a["correct"] and not b["correct"] for a, b in zip(after.rows, before.rows))
    broken = sum(b["correct"] and not a["correct"] for a, b in zip(after.rows, before.rows))
    print(f"held-out reward accuracy {on_policy['rewards/accuracies']:.3f} (on-policy), "
          f"{written['rewards/accuracies']:.3f} (embedded pairs); greedy task accuracy on {len(tasks)} validation "
          f"tasks: SFT {before.accuracy:.3f} -> DPO {after.accuracy:.3f} ({fixed} fixed, {broken} broken)")
    assert after.accuracy >= before.accuracy + 0.05 and fixed > 1.5 * broken  # measured 0.132 -> 0.187, 44 vs 27

    rows = read_metrics(out / "dpo/metrics.jsonl")
    evals = [r for r in rows if "forget/pretrain_ppl" in r]
    assert [r["step"] for r in evals] == [0, 40, 80, 120]
    assert all(r["forget/sft_ppl"] > 1 and r["forget/pretrain_ppl"] > 1 for r in evals)
    assert evals[0]["eval/rewards/accuracies"] == 0 and evals[-1]["eval/rewards/accuracies"] > 0.65
    assert all("val_loss" in r and "val_ppl" not in r for r in evals)  # a DPO loss has no perplexity
    trained = [r for r in rows if "rewards/margins" in r]
    assert trained and all(key in trained[-1] for key in ("loss", "rewards/chosen", "rewards/rejected",
                                                          "rewards/accuracies", "logps/chosen", "logps/rejected",
                                                          "kl_ref", "nll/chosen"))
    assert "ppl" not in trained[-1]
    assert (out / "dpo/forgetting.png").stat().st_size > 10_000


@pytest.mark.slow
def test_nohup_stop_and_resume_keeps_total_steps(tmp_path):
    prepared = run_script("run_pipeline.sh", "--only", DATA_STAGES, cwd=tmp_path, timeout=300)
    assert prepared.returncode == 0, prepared.stdout[-2000:] + prepared.stderr[-2000:]
    # 150 steps (about 40 s here, step 8 at 2 s) leave status.sh and stop.sh time to run after step 8: 60 steps took
    # 19 s on a loaded machine, and the run once finished before stop.sh came
    sets = ["--set", "pretrain.max_steps=150", "--set", "pretrain.save_interval_steps=5",
            "--set", "pretrain.log_interval=1"]
    launched = run_script("launch.sh", "--only", "pretrain", *sets, cwd=tmp_path, timeout=60)
    assert launched.returncode == 0, launched.stderr
    metrics = tmp_path / "out/pretrain/metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and any(row.get("step", 0) >= 8 for row in read_metrics(metrics))):
        assert time.monotonic() < deadline, (tmp_path / "logs/pipeline.log").read_text()[-2000:]
        time.sleep(1)
    status = run_script("status.sh", cwd=tmp_path, timeout=60)
    assert "pretrain" in status.stdout and "running" in status.stdout, status.stdout

    stopped = run_script("stop.sh", "pretrain", cwd=tmp_path, timeout=400)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    pipeline_pid = int((tmp_path / "logs/pipeline.pid").read_text())
    for _ in range(60):  # the pipeline notices the stage stopped early and exits without starting another
        if not Path(f"/proc/{pipeline_pid}").exists():
            break
        time.sleep(1)
    log = (tmp_path / "logs/pipeline.log").read_text()
    assert "stopped before it finished" in log, log[-2000:]
    assert not (tmp_path / "out/pretrain/final").exists()
    interrupted_at = max(json.loads(l)["step"] for l in metrics.read_text().splitlines())
    assert interrupted_at < 150
    assert list((tmp_path / "out/pretrain/checkpoints").iterdir()), "kill -2 must leave a checkpoint"

    resumed = run_script("run_pipeline.sh", "--only", "pretrain", *sets, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if "loss" in json.loads(l)]
    assert max(steps) == 150 and (tmp_path / "out/pretrain/final/config.json").exists()
    assert steps.count(1) == 1, steps  # resumed from the checkpoint, not restarted from step 1
