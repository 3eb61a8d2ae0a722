"""Stage 6's outputs: summary.json/.md/.csv, per-model task files and the plots."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from mateconv.evaluate.models import ModelReport, file_label
from mateconv.files import save_figure, write_atomic
from mateconv.winrate import WinRate


def plot_summary(reports: list[ModelReport], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [r.label for r in reports]
    metrics = [("validation perplexity", [r.ppl.ppl if r.ppl else math.nan for r in reports]),
               ("held-out bits per byte", [r.bpb.bpb if r.bpb else math.nan for r in reports]),
               ("task accuracy", [r.tasks.accuracy if r.tasks else math.nan for r in reports])]
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for ax, (title, values) in zip(axes, metrics):
        colors = ["tab:orange" if r.kind == "moe" else "tab:blue" for r in reports]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, rotation=20, ha="right")
        ax.set_title(title)
        for x, value in enumerate(values):
            if not math.isnan(value):
                ax.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=8)
    figure.suptitle("blue = dense FFN, orange = MoE")
    save_figure(figure, out_dir / "metrics.png")
    plt.close(figure)
    written.append(out_dir / "metrics.png")

    for report in reports:
        if report.ppl is None or report.ppl.expert_load is None:
            continue
        load = torch.tensor(report.ppl.expert_load)
        figure, ax = plt.subplots(figsize=(1.2 + 0.6 * load.shape[1], 1.0 + 0.45 * load.shape[0]))
        image = ax.imshow(load, cmap="viridis", aspect="auto")
        cells = torch.cartesian_prod(torch.arange(load.shape[0]), torch.arange(load.shape[1])).tolist()
        for (layer, expert), value in zip(cells, load.flatten().tolist()):
            ax.text(expert, layer, f"{value:.2f}", ha="center", va="center", color="w", fontsize=7)
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{report.label}: token share per expert (CV {report.balance['cv_mean']:.3f})")
        figure.colorbar(image, ax=ax)
        path = out_dir / f"expert_load_{file_label(report.label)}.png"
        save_figure(figure, path)
        plt.close(figure)
        written.append(path)
    return written


def columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in first-seen order (models differ in their win-rate columns)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def markdown_table(rows: list[dict]) -> str:
    header = columns(rows)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(k) is None else str(row[k]).replace("|", "\\|").replace("\n", " ")
                                       for k in header) + " |")
    return "\n".join(lines)


def win_rate_line(result: WinRate) -> str:
    """The progress line of a win rate, its figures as summary.json holds them (null where no prompt was judged)."""
    return f"[evaluate] win rate {result.model} vs {result.baseline}: {json.dumps(strict_json(result.as_dict()))}"


def strict_json(value):
    """`value` with NaN and infinities as None, so that summary.json is JSON any parser reads (JavaScript's, jq's)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strict_json(item) for item in value]
    return value


def write_summary(reports: list[ModelReport], out_dir: Path, not_evaluated: list[str] | None = None) -> None:
    """summary.csv, summary.json, summary.md and each model's task answers; `not_evaluated`: the models a stopped run
    did not reach, named in summary.json and summary.md."""
    rows = [report.row() for report in reports]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "summary.csv", buffer.getvalue())

    summary = {"models": [{**report.row(), "path": report.path,
                           "accuracy_by_kind": report.tasks.by_kind if report.tasks else None,
                           "expert_load": report.ppl.expert_load if report.ppl else None,
                           "bpb": None if report.bpb is None else {"tokens": report.bpb.tokens,
                                                                   "bytes": report.bpb.bytes,
                                                                   "documents": report.bpb.documents,
                                                                   "start": report.bpb_start},
                           "balance": report.balance, "samples": report.samples}
                          for report in reports],
               "win_rates": [w.as_dict() for report in reports for w in report.win_rates],
               **({"not_evaluated": not_evaluated} if not_evaluated else {})}
    write_atomic(out_dir / "summary.json", json.dumps(strict_json(summary), indent=2, ensure_ascii=False,
                                                      allow_nan=False) + "\n")

    parts = ["# MateConv evaluation", "", markdown_table(rows), "", "![metrics](metrics.png)", ""]
    if not_evaluated:
        parts[2:2] = [f"Stopped before it evaluated {', '.join(not_evaluated)}.", ""]
    for report in reports:
        if report.balance is not None:
            name = f"expert_load_{file_label(report.label)}.png"
            cv = ", ".join(f"{v:.3f}" for v in report.balance["cv"])
            parts += [f"## Expert load: {report.label}", "", f"per-layer CV: {cv}", "", f"![{name}]({name})", ""]
    wins = [w.as_dict() for report in reports for w in report.win_rates]
    if wins:
        parts += [f"## Win rates (judge: {wins[0]['judge']}; ties count half, failed requests are not judged)", "",
                  markdown_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in w.items()
                                   if k not in ("judge", "failures")} for w in wins]), ""]
    prompts = list(dict.fromkeys(p for r in reports for p in r.samples))
    parts += ["## Samples (greedy)", "",
              markdown_table([{"prompt": p, **{r.label: r.samples.get(p) for r in reports}} for p in prompts]), ""]
    if any(r.tasks for r in reports):
        parts += ["## Task accuracy by kind", ""]
        kinds = sorted({k for r in reports if r.tasks for k in r.tasks.by_kind})
        parts += [markdown_table([{"kind": k, **{r.label: (round(r.tasks.by_kind[k], 3) if r.tasks and k in
                                                          r.tasks.by_kind else None) for r in reports}}
                                  for k in kinds]), ""]
    write_atomic(out_dir / "summary.md", "\n".join(parts))
    for report in reports:
        if report.tasks:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in report.tasks.rows)
            write_atomic(out_dir / f"tasks_{file_label(report.label)}.jsonl", lines)
