"""Objectives: what the engine minimises. `loss(model, batch) -> (loss tensor, metrics dict)`: floats, or detached 0-d
tensors, which the engine reads only on log steps (no host sync per micro-batch). Each metric is the batch's own mean;
`weighed_metrics` says what it is a mean of, so that a step's or an evaluation's figure is the mean over all of it."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from mateconv.logprobs import IGNORE_INDEX, lm_inputs
from mateconv.train.checkpoint import unwrap


class Objective(Protocol):
    """`per_kind`: the metrics that are means over another kind of item than the first of `weights` (DPO's kl_ref:
    chosen-response tokens, not pairs)."""
    per_kind: Mapping[str, str]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             shares: Mapping[str, float | torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """`shares`: in training, the weight of the batch's items of each kind (see `weights`) in its step
        (`Trainer.shares`): each part of the loss that is a mean over a kind is multiplied by its share; a term of
        each forward (the MoE balance loss) is not, nor are the metrics."""
        ...

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """How many items of each kind the batch's means are over; the first kind's is what a validation loss over
        batches weighs each by."""
        ...


class LMObjective:
    """Next-token cross-entropy on `labels` (-100 ignored: SFT trains on assistant tokens only), plus in training the
    MoE balance loss that the model's forward then adds (a validation loss is the cross-entropy alone)."""

    per_kind: Mapping[str, str] = {}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             shares: Mapping[str, float | torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output = model(**lm_inputs(model, batch), labels=batch["labels"], use_cache=False)
        # the model's own mode: a DeepSpeed engine's `training` stays True through eval(), its module's does not
        aux = getattr(output, "aux_loss", None) if unwrap(model).training else None
        lm_loss = output.loss - aux if aux is not None else output.loss
        metrics = {"lm_loss": lm_loss.detach()}
        loss = lm_loss * (shares or {}).get("tokens", 1.0)
        if aux is None:
            return loss, metrics
        metrics["aux_loss"] = aux.detach()
        return loss + aux, metrics

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """The labelled tokens the cross-entropy averages over (the first label predicts nothing)."""
        return {"tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}


def weighed_metrics(objective: Objective, weights: dict[str, int],
                    metrics: dict[str, torch.Tensor | float]) -> dict[str, tuple[torch.Tensor | float, int]]:
    """Each of the objective's `metrics` of a batch with the weight of its mean (data.WeightedMeans): the count of the
    items it is a mean over, from the batch's `weights` (`objective.weights`): its `per_kind`, else the first kind
    (an LM's labelled tokens, DPO's pairs); the MoE balance loss, a term of each forward, weighs 1, as it does in the
    loss."""
    first = next(iter(weights))
    return {key: (value, 1 if key == "aux_loss" else weights[objective.per_kind.get(key, first)])
            for key, value in metrics.items()}
