"""lm-evaluation-harness on a native checkpoint (`out/sft/final` style, trust_remote_code) with the local task set:
its greedy-answer accuracy equals `mateconv.evaluate`'s on the same prompts, and `--lm_eval_tasks` puts lm-eval's
numbers into out/eval/summary.json."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mateconv.chat import load_model
from mateconv.evaluate.data import EvalError, read_jsonl
from mateconv.evaluate.metrics import task_accuracy
from mateconv.evaluate.run import evaluate
from mateconv.lm_eval_tasks import TASKS_DIR
from mateconv.lm_eval_tasks.utils import doc_to_choice, doc_to_target

LIMIT = 60  # held-out prompts (all of the tiny world's; both tools take the first LIMIT)


@pytest.fixture(scope="module")
def workdir(tiny_embedded_data, tmp_path_factory):
    """A directory laid out like a pipeline run: out/data/tasks_val.jsonl (the tasks' default path)."""
    root = tmp_path_factory.mktemp("lm_eval")
    (root / "out" / "data").mkdir(parents=True)
    shutil.copy(tiny_embedded_data / "tasks_val.jsonl", root / "out" / "data" / "tasks_val.jsonl")
    return root


@pytest.fixture(scope="module")
def ours(tiny_sft_model, workdir) -> float:
    model, tokenizer = load_model(tiny_sft_model, device="cpu", dtype="float32")
    records = read_jsonl(workdir / "out" / "data" / "tasks_val.jsonl")[:LIMIT]
    return task_accuracy(model, tokenizer, records).accuracy


@pytest.fixture(scope="module")
def ours_multiple_choice(tiny_sft_model, workdir) -> float:
    """Accuracy of picking the answer whose tokens have the highest summed log-probability after the chat prompt."""
    model, tokenizer = load_model(tiny_sft_model, device="cpu", dtype="float32")
    hits = []
    for doc in read_jsonl(workdir / "out" / "data" / "tasks_val.jsonl")[:LIMIT]:
        prompt = list(tokenizer.apply_chat_template(doc["messages"], add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
        scores = []
        for choice in doc_to_choice(doc):
            answer = tokenizer.encode(choice, add_special_tokens=False)
            with torch.no_grad():
                logps = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            scores.append(logps.gather(1, torch.tensor(answer)[:, None]).sum().item())
        hits.append(scores.index(max(scores)) == doc_to_target(doc))
    return sum(hits) / len(hits)


def test_lm_eval_cli_on_a_native_checkpoint(tiny_sft_model, workdir, ours, ours_multiple_choice):
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={tiny_sft_model},trust_remote_code=True,dtype=float32", "--include_path", str(TASKS_DIR),
               "--tasks", "mateconv_tasks_gen,mateconv_tasks_mc", "--apply_chat_template", "--batch_size", "1",
               "--device", "cpu", "--limit", str(LIMIT), "--output_path", "results"]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list((workdir / "results").rglob("results_*.json"))
    metrics = json.loads(path.read_text())["results"]
    assert metrics["mateconv_tasks_gen"]["acc,none"] == pytest.approx(ours)
    assert 0.0 < ours < 1.0  # a number that could differ between the two tools
    # multiple choice among up to 4 answers in the reply form (measured 0.23 on the tiny model: near chance)
    assert metrics["mateconv_tasks_mc"]["acc,none"] == pytest.approx(ours_multiple_choice)


def test_evaluate_runs_lm_eval_tasks_by_name(tiny_sft_model, workdir, ours, tmp_path):
    """On a run's training checkpoint, which lm-eval gets consolidated (it cannot read checkpoints/step_N itself); the
    last checkpoint holds the final weights, so the accuracy is the final model's."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000300"
    shutil.copytree(tiny_sft_model.parent / "checkpoints" / checkpoint.name, checkpoint)
    [report] = evaluate([checkpoint], tmp_path / "eval", val=None, tasks=workdir / "out/data/tasks_val.jsonl",
                        prompts=["Which is larger, 14 or 6?"], max_tasks=LIMIT, device="cpu",
                        lm_eval_tasks=["mateconv_tasks_gen"])
    assert report.tasks.accuracy == pytest.approx(ours)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"][0]
    assert summary["lm_eval:mateconv_tasks_gen/acc"] == pytest.approx(round(ours, 4))


def test_an_unknown_task_stops_before_any_model_loads(tmp_path):
    not_loaded = tmp_path / "model"  # would fail to load: the task names are checked first
    not_loaded.mkdir()
    (not_loaded / "config.json").write_text("{}")
    with pytest.raises(EvalError) as stopped:
        evaluate([not_loaded], tmp_path / "eval", val=None, tasks=None,
                 lm_eval_tasks=["mateconv_tasks_gen", "nosuchtask"])
    assert str(stopped.value) == "--lm_eval_tasks: lm-eval has no task nosuchtask ('lm-eval ls tasks' lists them)"
