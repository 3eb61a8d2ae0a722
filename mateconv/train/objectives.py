"""Objectives: what the engine minimises. `loss(model, batch) -> (loss tensor, metrics dict)`: floats, or detached 0-d
tensors, which the engine reads only on log steps (no host sync per micro-batch). Each metric is the batch's own mean;
`weighed_metrics` says what it is a mean of, so that a step's or an evaluation's figure is the mean over all of it."""
from __future__ import annotations

from typing import Protocol

import torch

from mateconv.logprobs import IGNORE_INDEX, lm_inputs
from mateconv.train.checkpoint import unwrap


class Objective(Protocol):
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             share: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """`share`: in training, the weight of the batch's items (see `weight`) in its step (`Trainer.shares`): the
        part of the loss that is a mean over them is multiplied by it; a term of each forward (the MoE balance loss)
        is not, nor are the metrics."""
        ...

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items the batch's loss is the mean of: a validation loss over batches weighs each by it."""
        ...

    def token_weights(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """The metrics of `loss` that are means over other items than `weight`'s (DPO's: tokens, not pairs), each with
        how many of those the batch has."""
        ...


class LMObjective:
    """Next-token cross-entropy on `labels` (-100 ignored: SFT trains on assistant tokens only), plus in training the
    MoE balance loss that the model's forward then adds (a validation loss is the cross-entropy alone)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             share: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output = model(**lm_inputs(model, batch), labels=batch["labels"], use_cache=False)
        # the model's own mode: a DeepSpeed engine's `training` stays True through eval(), its module's does not
        aux = getattr(output, "aux_loss", None) if unwrap(model).training else None
        lm_loss = output.loss - aux if aux is not None else output.loss
        metrics = {"lm_loss": lm_loss.detach()}
        if aux is None:
            return lm_loss * share, metrics
        metrics["aux_loss"] = aux.detach()
        return lm_loss * share + aux, metrics

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The labelled tokens the cross-entropy averages over (the first label predicts nothing)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def token_weights(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """None other: lm_loss is a mean over `weight`'s tokens."""
        return {}


def weighed_metrics(objective: Objective, batch: dict[str, torch.Tensor],
                    metrics: dict[str, torch.Tensor | float]) -> dict[str, tuple[torch.Tensor | float, int]]:
    """Each of the objective's `metrics` of `batch` with the weight of its mean (data.WeightedMeans): the tokens of a
    per-token one (`token_weights`), else the batch's items (`weight`: an LM's labelled tokens, DPO's pairs); the MoE
    balance loss, a term of each forward, weighs 1, as it does in the loss. Counted on the host copy of the batch."""
    per_token, items = objective.token_weights(batch), objective.weight(batch)
    return {key: (value, 1 if key == "aux_loss" else per_token.get(key, items)) for key, value in metrics.items()}
