"""Objectives: what the engine minimises. `loss(model, batch) -> (loss tensor, metrics dict)`: floats, or detached 0-d
tensors, which the engine reads only on log steps (no host sync per micro-batch)."""
from __future__ import annotations

from typing import Protocol

import torch

from mateconv.logprobs import IGNORE_INDEX, lm_inputs
from mateconv.train.checkpoint import unwrap


class Objective(Protocol):
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             share: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """`share`: in training, the weight of the batch's items (see `weight`) in its step (`Trainer.shares`): the
        part of the loss that is a mean over them, and its metric, are multiplied by it; a term of each forward (the
        MoE balance loss) is not."""
        ...

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items the batch's loss is the mean of: a validation loss over batches weighs each by it."""
        ...


class LMObjective:
    """Next-token cross-entropy on `labels` (-100 ignored: SFT trains on assistant tokens only), plus in training the
    MoE balance loss that the model's forward then adds (a validation loss is the cross-entropy alone)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             share: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output = model(**lm_inputs(model, batch), labels=batch["labels"], use_cache=False)
        # the model's own mode: a DeepSpeed engine's `training` stays True through eval(), its module's does not
        aux = getattr(output, "aux_loss", None) if unwrap(model).training else None
        lm_loss = (output.loss - aux if aux is not None else output.loss) * share
        metrics = {"lm_loss": lm_loss.detach()}
        if aux is None:
            return lm_loss, metrics
        metrics["aux_loss"] = aux.detach()
        return lm_loss + aux, metrics

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The labelled tokens the cross-entropy averages over (the first label predicts nothing)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
