"""Per-token log-probabilities of labelled tokens under a causal LM.

Shift convention as in Hugging Face: position t's logits predict token t+1, so the
outputs have length seq_len - 1 and the first label is never scored. Labels of -100
(prompt, padding) are masked out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], labels [B, T] -> (log p(label) [B, T-1] float32, zero where masked; mask [B, T-1] bool)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [batch, seq]")
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # cross_entropy gathers the label's log-softmax without keeping a [B, T, V] log-prob tensor around
    nll = F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    return -nll * mask, mask


def trim_right_padding(*tensors: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the columns that are padding in every row (right-padded batches), so the forward is shorter."""
    used = attention_mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return tuple(t[:, :length] for t in tensors)


def model_token_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward: (per-token label log-probs [B, T-1], mask [B, T-1], the model's MoE aux loss or None)."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logps, mask = token_logps(output.logits, labels)
    return logps, mask, getattr(output, "aux_loss", None)
