"""Objectives: what the engine minimises. `loss(model, batch) -> (loss tensor, metrics dict of floats)`."""
from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ...


class LMObjective:
    """Next-token cross-entropy on `labels` (-100 ignored: SFT trains on assistant tokens only), plus the MoE
    balance loss that the model's forward already adds."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        output = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       labels=batch["labels"], use_cache=False)
        aux = getattr(output, "aux_loss", None)
        metrics = {"lm_loss": (output.loss - aux).item() if aux is not None else output.loss.item()}
        if aux is not None:
            metrics["aux_loss"] = aux.item()
        return output.loss, metrics
