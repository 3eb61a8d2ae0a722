"""Training curves from a run's metrics.jsonl, as a picture next to it (`<out_dir>/training.png`): the loss (each
logged step, a moving average and the validation loss), the learning rate, the gradient norm before clipping, real
tokens per second, and for a MoE model the expert-load imbalance per layer. W&B shows the same when it is online;
this is for runs without it (`--tracker none`, offline) and for a look at `out/` afterwards."""
from __future__ import annotations

from pathlib import Path

from mateconv.config import is_training_checkpoint
from mateconv.files import read_metrics, save_figure

LAYER_CV = "moe/layer{}/cv"
TRAINING_PNG = "training.png"


def number(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have `key` as a number."""
    points = [(int(r["step"]), number(r, key)) for r in rows if "step" in r and number(r, key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def training_loss(rows: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the logged training steps, a MoE model's without its balance loss (`moe/aux_loss`): an
    evaluation leaves that out, so the curve compares with the validation loss."""
    points = [(int(r["step"]), number(r, "loss") - (number(r, "moe/aux_loss") or 0.0)) for r in rows
              if "step" in r and number(r, "loss") is not None]
    return [s for s, _ in points], [v for _, v in points]


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to `window - 1` before it."""
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def training_figure(rows: list[dict], title: str):
    """The figure: 4 panels, 5 for a MoE model (its rows carry `moe/layerN/cv`)."""
    from matplotlib.figure import Figure  # heavy, and needed only at the end of a run

    layers = sorted({int(key.split("/")[1].removeprefix("layer")) for row in rows for key in row
                     if key.startswith("moe/layer") and key.endswith("/cv")})
    panels = 5 if layers else 4
    figure = Figure(figsize=(4.2 * panels, 3.6), layout="constrained")
    axes = figure.subplots(1, panels)
    steps, loss = training_loss(rows)
    axes[0].plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (logged steps)")
    if len(loss) > 4:
        axes[0].plot(steps, moving_average(loss, max(2, len(loss) // 20)), color="tab:blue", label="train, averaged")
    val_steps, val_loss = series(rows, "val_loss")
    if val_loss:
        axes[0].plot(val_steps, val_loss, "o-", color="tab:orange", markersize=3, label="validation")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend(fontsize=8)
    for axis, (key, label) in zip(axes[1:4], (("lr", "learning rate"), ("grad_norm", "gradient norm (before clip)"),
                                              ("real_tokens_per_sec", "real tokens / s"))):
        axis.plot(*series(rows, key), color="tab:green")
        axis.set(title=label, xlabel="step")
    if layers:
        for layer in layers:
            axes[4].plot(*series(rows, LAYER_CV.format(layer)), linewidth=0.9, label=f"layer {layer}")
        axes[4].set(title="MoE expert load: CV per layer (0 = balanced)", xlabel="step")
        axes[4].legend(fontsize=7, ncol=2)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    return figure


def plot_training(metrics_jsonl: Path, out_png: Path, title: str) -> Path | None:
    """Writes the figure for a metrics.jsonl (atomically); None when it has no logged training step."""
    rows = read_metrics(metrics_jsonl) if Path(metrics_jsonl).is_file() else []
    if not series(rows, "loss")[0]:
        return None
    save_figure(training_figure(rows, title), Path(out_png))
    return Path(out_png)


def run_curves(model: str | Path) -> Path | None:
    """The training curves of the run a model path belongs to, None when it has none: out/<stage>/final and a training
    checkpoint out/<stage>/checkpoints/step_N both give out/<stage>/training.png."""
    model = Path(model)
    run = model.parent.parent if is_training_checkpoint(model) else model.parent
    return run / TRAINING_PNG if (run / TRAINING_PNG).is_file() else None
