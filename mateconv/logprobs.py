"""Per-token log-probabilities of labelled tokens under a causal LM, and perplexity over a data set.

Shift convention as in Hugging Face: position t's logits predict token t+1, so the
outputs have length seq_len - 1 and the first label is never scored. Labels of -100
(prompt, padding) are masked out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

IGNORE_INDEX = -100


def model_config(model):
    return getattr(getattr(model, "module", model), "config", None)


def token_mask_input(model, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{"token_mask": ...} for a MateConv model, whose MoE expert load and balance loss then leave padding out;
    nothing for other models (their forward has no such argument) or without a mask."""
    if token_mask is None or getattr(model_config(model), "model_type", None) != "mateconv":
        return {}
    return {"token_mask": token_mask}


def lm_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """A batch's forward inputs: input_ids and attention_mask, plus the position_ids of packed pretraining rows for
    models that mask documents from each other (MateConv's `document_mask`), and the token_mask of padded rows (SFT)
    for MateConv models. Other models get no position_ids: restarted positions without the mask would only confuse
    them."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if "position_ids" in batch and getattr(model_config(model), "document_mask", False):
        inputs["position_ids"] = batch["position_ids"]
    return {**inputs, **token_mask_input(model, batch.get("token_mask"))}


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
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward over right-padded rows: (per-token label log-probs [B, T-1], mask [B, T-1], the model's MoE aux
    loss or None). Real tokens come first and attend only backwards, so plain causal attention is exact for them and
    no attention mask is passed (a mask would cost the model a check on the host per forward); `token_mask` (the
    rows' real tokens) only keeps padding out of a MateConv MoE's expert load and balance loss."""
    output = model(input_ids=input_ids, use_cache=False, **token_mask_input(model, token_mask))
    logps, mask = token_logps(output.logits, labels)
    return logps, mask, getattr(output, "aux_loss", None)


@dataclass
class Perplexity:
    loss: float
    ppl: float
    tokens: int
    expert_load: list[list[float]] | None = None  # [n_layers][n_experts] token fractions, MoE only


@torch.inference_mode()
def perplexity(model, dataset: Dataset, batch_size: int = 8, max_batches: int | None = None) -> Perplexity:
    """Mean next-token NLL (without the MoE aux loss) over the labelled tokens; MoE load averaged per real token."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    total_nll, total_tokens = 0.0, 0
    load_sum, load_weight = None, 0
    batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    progress = tqdm(loader, total=batches, desc="perplexity", unit="batch", leave=False)
    for step, batch in enumerate(progress):
        if step == batches:
            break
        batch = {key: value.to(model.device) for key, value in batch.items()}
        output = model(**lm_inputs(model, batch), use_cache=False)
        logps, mask = token_logps(output.logits, batch["labels"])
        total_nll -= float(logps.sum())
        total_tokens += int(mask.sum())
        load = model.expert_load() if hasattr(model, "expert_load") else None
        if load is not None:
            real = batch.get("token_mask", batch.get("attention_mask"))  # the tokens the load counted
            weight = int(real.sum()) if real is not None else batch["input_ids"].numel()
            load_sum = load.float().cpu() * weight + (0 if load_sum is None else load_sum)
            load_weight += weight
        progress.set_postfix(ppl=f"{math.exp(total_nll / max(total_tokens, 1)):.2f}")
    if total_tokens == 0:
        raise ValueError("the validation data has no labelled tokens")
    loss = total_nll / total_tokens
    expert_load = None if load_sum is None else (load_sum / load_weight).tolist()
    return Perplexity(loss, math.exp(loss), total_tokens, expert_load)


@dataclass
class BitsPerByte:
    bpb: float  # total NLL in bits / UTF-8 bytes of the texts
    nll: float  # total NLL in nats
    tokens: int  # scored tokens (every token of every text)
    bytes: int
    documents: int


def document_windows(ids: list[int], start: list[int], length: int) -> list[tuple[list[int], int]]:
    """`start + ids` cut into windows of at most `length` tokens, each window after the first beginning with the last
    token of the one before; returns (window, how many leading positions are not scored). Every token of `ids` is
    scored exactly once; the tokens of `start` are context only."""
    sequence = start + ids
    windows, begin = [], 0
    while begin + 1 < len(sequence):
        end = min(begin + length, len(sequence))
        windows.append((sequence[begin:end], max(len(start) - begin, 1)))
        begin = end - 1
    return windows


@torch.inference_mode()
def bits_per_byte(model, tokenizer, texts: list[str], seq_len: int, batch_size: int = 8,
                  start_ids: list[int] | None = None) -> BitsPerByte:
    """Tokenizer-independent held-out loss: total NLL (nats) of whole documents / (ln 2 x their UTF-8 bytes).

    Each text is tokenized whole (no special tokens) and every one of its tokens is scored, conditioned on
    `start_ids` (default: the EOS id, which precedes a document in packed pretraining) and on the text before it;
    documents longer than `seq_len` are scored in consecutive windows that each carry one token of context. Works
    with any causal LM whose forward takes `input_ids` and returns `.logits`."""
    start = [tokenizer.eos_token_id] if start_ids is None else list(start_ids)
    if not start:
        raise ValueError("start_ids must hold at least one token: the first token of a text needs a context")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    windows, total_bytes, total_tokens = [], 0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        windows += document_windows(ids, start, seq_len)
        total_bytes += len(text.encode("utf-8"))
        total_tokens += len(ids)
    if total_bytes == 0:
        raise ValueError("no text to score (all texts are empty)")
    windows.sort(key=lambda window: len(window[0]), reverse=True)  # similar lengths share a batch: little padding
    device = next(model.parameters()).device
    total_nll = 0.0
    for first in tqdm(range(0, len(windows), batch_size), desc="bits/byte", unit="batch", leave=False):
        chunk = windows[first: first + batch_size]
        width = len(chunk[0][0])
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX)
        for row, (window, unscored) in enumerate(chunk):
            input_ids[row, : len(window)] = torch.tensor(window)
            labels[row, unscored: len(window)] = torch.tensor(window[unscored:])
        # right padding needs no attention mask: causal attention keeps the real tokens from seeing it
        logits = model(input_ids.to(device), use_cache=False).logits
        logps, _ = token_logps(logits, labels.to(device))
        total_nll -= float(logps.sum())
    return BitsPerByte(total_nll / (math.log(2) * total_bytes), total_nll, total_tokens, total_bytes, len(texts))
