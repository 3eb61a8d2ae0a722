"""Training curves (`<out_dir>/training.png`) from a run's metrics.jsonl."""
from __future__ import annotations

import json

import pytest

from mateconv.train.curves import moving_average, plot_training, run_curves, training_figure


def rows(steps: int, moe: bool) -> list[dict]:
    logged = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 8.0 - step * 0.01, "lr": 1e-3, "grad_norm": 1.0, "real_tokens_per_sec": 900.0}
        if moe:
            row.update({"moe/layer0/cv": 0.3, "moe/layer1/cv": 0.2, "moe/cv_mean": 0.25})
        logged.append(row)
        if step % 25 == 0:
            logged.append({"step": step, "val_loss": 7.9})
    return logged


def test_panels_and_their_series():
    figure = training_figure(rows(100, moe=True), "pretrain")
    loss, lr, grad_norm, tokens, load = figure.axes
    raw, averaged, validation = loss.get_lines()
    assert len(raw.get_xdata()) == 100 and list(validation.get_xdata()) == [25, 50, 75, 100]
    assert averaged.get_ydata()[-1] > raw.get_ydata()[-1]  # the average of a falling loss lags behind it
    assert [line.get_label() for line in load.get_lines()] == ["layer 0", "layer 1"]
    assert len(training_figure(rows(100, moe=False), "sft").axes) == 4  # no MoE panel for a dense model


def test_moe_training_loss_is_drawn_without_the_balance_loss():
    """Validation leaves the MoE balance loss out, training's `loss` has it (about aux_loss_alpha per layer: 0.8 for
    the 8-layer preset): drawn as it was, the training curve sat above the validation curve by that much. The train
    curve is `loss` less `moe/aux_loss`, the same objective the validation measures (also DPO's, with no lm_loss)."""
    logged = [{"step": 1, "loss": 6.4, "moe/aux_loss": 0.8, "moe/layer0/cv": 0.3},
              {"step": 1, "val_loss": 5.6}, {"step": 2, "loss": 1.5, "moe/layer0/cv": 0.3}]
    raw = training_figure(logged, "pretrain").axes[0].get_lines()[0]
    assert list(raw.get_ydata()) == pytest.approx([5.6, 1.5])


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_written_only_when_there_is_a_training_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 0, "val_loss": 0.69}) + "\n")  # DPO's evaluation at the start alone
    assert plot_training(metrics, tmp_path / "training.png", "dpo") is None
    assert plot_training(tmp_path / "missing.jsonl", tmp_path / "training.png", "dpo") is None
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows(10, moe=False)))
    assert plot_training(metrics, tmp_path / "training.png", "dpo") == tmp_path / "training.png"
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_run_curves_of_a_final_model_and_of_a_training_checkpoint(tmp_path):
    """6.inference_evaluate.ipynb shows them for each model: a checkpoint's are its run's, two folders up (it looked in
    out/<stage>/checkpoints/ and showed none)."""
    run = tmp_path / "out" / "sft"
    final, step = run / "final", run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    final.mkdir()
    (final / "config.json").write_text("{}")
    assert run_curves(final) is None and run_curves(step) is None  # a run stopped before its first logged step
    (run / "training.png").write_bytes(b"\x89PNG")
    assert run_curves(final) == run_curves(str(step)) == run / "training.png"
