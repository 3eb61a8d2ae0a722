"""Stage 6 end to end: `python -m mateconv.evaluate` and the 6.inference_evaluate.ipynb notebook (run for real with
nbclient) on tiny dense and MoE checkpoints trained in the test."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mateconv.evaluate import main
from tiny_checkpoints import QA, checkpoint, single_thread, tasks_jsonl, texts_jsonl  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def check_outputs(out: Path, labels: list[str]) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == labels
    dense, moe = summary["models"]
    assert dense["kind"] == "dense" and moe["kind"] == "moe"
    assert dense["val_ppl"] < 3.0 and moe["val_ppl"] > 1.0  # the dense model memorised the validation texts
    assert dense["expert_load"] is None and dense["balance"] is None
    assert len(moe["expert_load"]) == 2 and len(moe["expert_load"][0]) == 4
    assert moe["load_cv_mean"] == pytest.approx(sum(moe["balance"]["cv"]) / 2, abs=1e-4)
    assert dense["samples"][QA[0][0]] == QA[0][1]
    assert dense["task_accuracy"] == pytest.approx(6 / 7, abs=1e-4) and dense["tasks_n"] == 7
    assert dense["accuracy_by_kind"] == {"add": 0.75, "word": 1.0}
    assert 0.0 <= moe["task_accuracy"] <= 1.0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["model"] for r in rows] == labels and float(rows[0]["val_ppl"]) == dense["val_ppl"]
    markdown = (out / "summary.md").read_text()
    assert "| model | kind |" in markdown and "expert_load_" in markdown and QA[0][0] in markdown
    assert "## Task accuracy by kind" in markdown
    verdicts = [json.loads(line)["correct"] for line in (out / f"tasks_{labels[0].replace('/', '_')}.jsonl").open()]
    assert verdicts == [True] * 6 + [False]
    for png in ["metrics.png", f"expert_load_{labels[1].replace('/', '_')}.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return summary


def test_cli_writes_summaries_and_plots(tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "mateconv.evaluate", "--models", str(checkpoint("dense")), str(checkpoint("moe")),
               "--val", str(texts_jsonl()), "--tasks", str(tasks_jsonl()), "--prompts", QA[0][0], "Say hello.",
               "--max_new_tokens", "8", "--out_dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    root = checkpoint("dense").parent.name
    check_outputs(out, [f"{root}/dense", f"{root}/moe"])


def test_cli_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as error:
        main(["--models", str(tmp_path / "missing"), "--out_dir", str(tmp_path)])
    assert str(error.value) == f"evaluate: no model at {tmp_path / 'missing'} (expected a save_pretrained directory)"
    with pytest.raises(SystemExit) as error:
        main(["--models", str(checkpoint("dense")), "--val", str(tmp_path / "nope.jsonl"), "--out_dir", str(tmp_path)])
    assert str(error.value) == f"evaluate: validation data not found: {tmp_path / 'nope.jsonl'}"


@pytest.mark.slow
def test_notebook_runs_with_parameters(tmp_path):
    notebook = nbformat.read(ROOT / "6.inference_evaluate.ipynb", as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = {"MODELS": [str(checkpoint("dense")), str(checkpoint("moe")), str(tmp_path / "not_trained_yet")],
                 "VAL": str(texts_jsonl()), "TASKS": str(tasks_jsonl()), "OUT_DIR": str(tmp_path / "eval"),
                 "PROMPTS": [QA[0][0], "Say hello."], "MAX_NEW_TOKENS": 8}
    source = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute(env=ENV)
    root = checkpoint("dense").parent.name
    check_outputs(tmp_path / "eval", [f"{root}/dense", f"{root}/moe"])
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # plots are shown inline
    assert any("not_trained_yet" in o.get("text", "") for o in outputs)  # missing checkpoints are reported
