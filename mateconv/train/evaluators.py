"""Evaluators: what a stage measures at each evaluation besides the engine's validation loss. Each factory takes
(config, runtime, data, objective) and returns `evaluate(model) -> metrics`, or None when it has nothing to measure.

DPO's: the held-out preference pairs (reward accuracy, margins, KL; their loss is the val_loss that picks the best
checkpoint) and catastrophic forgetting, the perplexity of held-out pretraining and SFT data (`forget/<name>_ppl`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mateconv.config import TrainConfig
from mateconv.data.shards import PretrainTokens, SFTTokens, shard_info
from mateconv.files import read_metrics, save_figure
from mateconv.train.data import StageData, first_rows, split_means
from mateconv.train.distributed import Runtime
from mateconv.train.dpo import DPOError, DPOObjective
from mateconv.train.objectives import LMObjective, Objective, weighed_metrics

EVAL_REWARD_KEYS = ("eval/rewards/accuracies", "eval/rewards/margins")
Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@torch.no_grad()
def preference_eval(model: torch.nn.Module, objective: DPOObjective, pairs: Dataset, batch_size: int,
                    device: torch.device | str) -> dict[str, float]:
    """The objective's loss and metrics over held-out pairs (reward accuracy, margins, KL, ...), the ranks splitting
    them (`split_means`): means over the pairs, kl_ref and nll/chosen over the chosen responses' tokens, and the loss
    that of those means, so the same with any batch size and number of ranks."""
    def measure(batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        _, metrics = objective.loss(model, {k: v.to(device) for k, v in batch.items()})
        return weighed_metrics(objective, objective.weights(batch), metrics)

    means = split_means(pairs, batch_size, measure, device)
    return {"loss": objective.total(means["dpo_loss"], means.get("kl_ref", 0.0), means.get("nll/chosen", 0.0)),
            **means}


@torch.no_grad()
def forgetting_eval(model: torch.nn.Module, held_out: dict[str, Dataset], batch_size: int,
                    device: torch.device | str) -> dict[str, float]:
    """`{"forget/<name>_ppl": perplexity}` for each held-out LM data set (e.g. pretrain and sft validation shards):
    exp of the mean NLL per labelled token, the ranks splitting the rows (`split_means`)."""
    lm = LMObjective()

    def measure(batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        _, metrics = lm.loss(model, {k: v.to(device) for k, v in batch.items()})
        return {"nll": (metrics["lm_loss"], lm.weights(batch)["tokens"])}

    return {f"forget/{name}_ppl": math.exp(split_means(data, batch_size, measure, device)["nll"])
            for name, data in held_out.items()}


def held_out_lm_data(config: TrainConfig, vocab_size: int | None, report: bool = True) -> dict[str, Dataset]:
    """Pretraining/SFT validation shards for the forgetting curves, named by their stage directory; those tokenized
    with another vocabulary than the preference pairs' (`vocab_size`; an earlier run's `out/`, say) are skipped, with
    a line saying why when `report` (on the main rank only, not once per rank)."""
    readers = {"pretrain": PretrainTokens, "sft": SFTTokens}
    data = {}

    def skip(reason: str) -> None:
        if report:
            print(f"[dpo] forgetting eval: {reason}, skipped", flush=True)

    for path in map(Path, config.dpo.forget_data_paths):
        if not (path / "index.json").is_file():
            skip(f"{path} not found")
            continue
        info = shard_info(path)
        kind = info["kind"]
        if kind not in readers:
            raise DPOError(f"forget_data_paths: {path} holds {kind!r} shards; pretrain or sft expected")
        if vocab_size is not None and info["vocab_size"] != vocab_size:
            skip(f"{path} was tokenized with a {info['vocab_size']}-token vocabulary, the preference pairs with "
                 f"{vocab_size}: another tokenizer")
            continue
        name = path.parent.name if path.name in ("val", "train") else path.name
        data[name] = readers[kind](path, config.model.max_seq_len)
        if not info["num_records"]:
            skip(f"{path} holds no records")
            del data[name]
        elif not len(data[name]):  # SFT conversations whose prompts fill max_seq_len have no labelled token
            skip(f"{path} has no labelled token within max_seq_len {config.model.max_seq_len}")
            del data[name]
    return data


def preference_evaluator(config: TrainConfig, runtime: Runtime, data: StageData,
                         objective: Objective) -> Evaluator | None:
    """The objective on the held-out pairs (`data.val`, its first `eval_rows`, split over the ranks): its loss as
    `val_loss` and every metric as `eval/<metric>`."""
    if data.val is None:
        return None
    held_out = first_rows(data.val, config.track.eval_rows(config.optim.batch_size))

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        pairs = preference_eval(model, objective, held_out, config.optim.batch_size, runtime.device)
        loss = pairs.pop("loss")  # once, as val_loss: the score that picks the best checkpoint
        return {"val_loss": loss, **{f"eval/{key}": value for key, value in pairs.items()}}

    return evaluate


def forgetting_evaluator(config: TrainConfig, runtime: Runtime, data: StageData,
                         objective: Objective) -> Evaluator | None:
    """`forget/<name>_ppl` for each of `forget_data_paths` that exists (its first `eval_rows`, split over the
    ranks)."""
    rows = config.track.eval_rows(config.optim.batch_size)
    held_out = {name: first_rows(lm_data, rows)
                for name, lm_data in held_out_lm_data(config, data.vocab_size, runtime.is_main).items()}
    if not held_out:
        return None
    return lambda model: forgetting_eval(model, held_out, config.optim.batch_size, runtime.device)


def plot_forgetting(metrics_jsonl: Path, out_png: Path) -> Path:
    """Held-out perplexities (left) and held-out reward accuracy (right) against the DPO step."""
    from matplotlib.figure import Figure  # heavy, and needed only at the end of a DPO run

    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(metrics_jsonl):
        for key, value in record.items():
            if (key.startswith("forget/") or key in EVAL_REWARD_KEYS) and isinstance(value, (int, float)):
                series.setdefault(key, []).append((int(record["step"]), float(value)))
    if not series:
        raise DPOError(f"{metrics_jsonl} has no forgetting metrics (forget/*) to plot")
    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    for key, points in sorted(series.items()):
        axis = left if key.startswith("forget/") else right
        steps, values = zip(*sorted(points))
        axis.plot(steps, values, marker="o", label=key.split("/", 1)[1])
    left.set(title="held-out perplexity (lower = less forgetting)", xlabel="DPO step", ylabel="perplexity")
    right.set(title="held-out preference pairs", xlabel="DPO step")
    right.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # not the 0.5 line alone (a run without held-out pairs)
            axis.legend()
    save_figure(figure, Path(out_png))
    return Path(out_png)
