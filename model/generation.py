"""Fast batched generation with a preallocated KV cache, sampling, and streaming text.

`generate_tokens` and `stream_text` drive MateConv models with `KVCache` and any other Hugging Face causal LM with a
`DynamicCache`. The chat CLI, the OpenAI-compatible server and the evaluation call these.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from model.modeling import MateConvForCausalLM


@dataclass
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 disable those filters; repetition_penalty 1.0 disables it.
    OpenAI's presence_penalty and frequency_penalty (0 disables them) and logit_bias ({token id: added to its
    logit}): see `adjust_logits`."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class KVCache:
    """Per-layer key/value buffers [B, n_kv_heads, capacity, head_dim], filled in place (no reallocation per step).
    Implements the two methods MateConv's attention uses from Hugging Face's Cache API.

    The prompt's forward appends and `update` returns the filled part. After `start_decoding`, each `update` writes
    the step's one token at slot `position` (a tensor) and returns the whole buffers, of which attention sees the
    slots where `visible` is 0 (-inf: the prompt's padding and the slots not written yet). Every decode step then
    has the same shapes and reads no Python number that changes, so one compiled graph (one CUDA graph under
    mode="reduce-overhead") serves all of them."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_kv_heads, capacity, head_dim)
        # zeros, not empty: a masked slot still enters the attention product as 0 * value, and 0 * NaN is NaN
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # the slot the next decode step writes
        # added to the attention scores: 0 for the keys attention sees, -inf for the others (a float mask, not a bool
        # one, spares SDPA a conversion per layer and step)
        self.visible = torch.full((batch, capacity), float("-inf"), device=device, dtype=dtype)
        self.padding = torch.zeros(batch, 1, dtype=torch.long, device=device)  # per row: rope position = slot - this
        self.reset()

    def reset(self) -> None:
        self.lengths = [0] * len(self.keys)
        self.decoding = False

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.position, self.visible, self.padding]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decoding:
            self.keys[layer_idx].index_copy_(2, self.position, key)
            self.values[layer_idx].index_copy_(2, self.position, value)
            return self.keys[layer_idx], self.values[layer_idx]
        start, end = self.lengths[layer_idx], self.lengths[layer_idx] + key.shape[2]
        if end > self.keys[layer_idx].shape[2]:
            raise ValueError(f"KV cache capacity {self.keys[layer_idx].shape[2]} exceeded ({end} positions)")
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def start_decoding(self, attention_mask: torch.Tensor | None) -> None:
        """After the prompt's forward: the prompt's padding (attention_mask 0) stays masked, and from now on each
        `update` writes one token at slot `position`."""
        length = self.lengths[0]
        self.visible.fill_(float("-inf"))
        self.visible[:, :length] = 0.0
        if attention_mask is not None:
            self.visible[:, :length].masked_fill_(attention_mask == 0, float("-inf"))
        self.padding.copy_(length - (self.visible == 0).sum(-1, keepdim=True))
        self.position.fill_(length)
        self.decoding = True


def new_cache(model, batch: int, capacity: int):
    if not isinstance(model, MateConvForCausalLM):
        return DynamicCache(config=model.config)
    config, weight = model.config, model.lm_head.weight
    return KVCache(config.n_layers, batch, config.n_kv_heads, config.head_dim, capacity, weight.device, weight.dtype)


def decode_step(model, cache: KVCache, token: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, V] after one more token per row (token [B]), written at slot `cache.position`."""
    cache.visible.index_fill_(1, cache.position, 0.0)
    logits = model(input_ids=token[:, None], attention_mask=cache.visible[:, None, None, :],
                   position_ids=cache.position - cache.padding, cache=cache, use_cache=True).logits[:, -1]
    cache.position.add_(1)
    return logits


@functools.cache
def compiled_decode_step(device_type: str):
    """`decode_step` compiled once per process, one graph per model and batch size (dynamic=False: no symbolic
    shapes); on CUDA as CUDA graphs, which take away the per-kernel launch cost that bounds small-batch decoding."""
    return torch.compile(decode_step, mode="reduce-overhead" if device_type == "cuda" else "default", dynamic=False)


# Compiled decoding reuses its caches (full context, model -> {batch: [free caches]}): a CUDA graph replays on the
# addresses it was recorded with, so fresh buffers for every call would record a new graph every time.
_FREE_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def take_cache(model, batch: int) -> KVCache:
    free = _FREE_CACHES.setdefault(model, {}).setdefault(batch, [])
    if free:
        cache = free.pop()
        cache.reset()
        return cache
    cache = new_cache(model, batch, model.config.max_seq_len)
    for tensor in cache.tensors():
        torch._dynamo.mark_static_address(tensor)
    return cache


def give_back(model, cache: KVCache) -> None:
    _FREE_CACHES[model][cache.visible.shape[0]].append(cache)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: for tokens already in the sequence (seen [B, V] bool), divide positive logits by the penalty and
    multiply negative ones by it (penalty > 1 makes repeats less likely)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def adjust_logits(logits: torch.Tensor, counts: torch.Tensor | None, bias: torch.Tensor | None,
                  sampling: SamplingConfig) -> torch.Tensor:
    """OpenAI's logit_bias (bias [V], added) and penalties over the tokens generated so far (counts [B, V]):
    logits - presence_penalty * (count > 0) - frequency_penalty * count."""
    if bias is not None:
        logits = logits.float() + bias
    if counts is not None:
        logits = logits.float() - sampling.presence_penalty * (counts > 0) - sampling.frequency_penalty * counts
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set whose probability reaches top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        drop_sorted[:, 0] = False  # the best token stays, also for a top_p that is 0 in float32
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from next-token logits [B, V]."""
    logits = apply_repetition_penalty(logits.float(), seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    # the best logit shifted to 0 first: a tiny temperature then sends the others to -inf, never the best to inf (NaN)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    logits = filter_top_k_top_p(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def iter_tokens(model, input_ids: torch.Tensor, sampling: SamplingConfig, attention_mask: torch.Tensor | None = None,
                eos_token_id: int | None = None, pad_token_id: int | None = None,
                generator: torch.Generator | None = None, compile: bool | None = None,
                constraint=None) -> Iterator[torch.Tensor]:
    """Yields the next token of every row ([B] long tensor) until all rows hit EOS or max_new_tokens is reached.
    Rows that finished get `pad_token_id` (default: the EOS id). Left-padded batches need `attention_mask`.
    constraint: an object with `mask(logits [B, V]) -> logits` (tokens that may not come next at -inf) and
    `advance(tokens [B])`, e.g. `mateconv.json_grammar.GrammarConstraint`.

    MateConv models decode with the fixed-shape `decode_step`, compiled when `compile` is true (None: on CUDA, where
    it runs as CUDA graphs); other causal LMs step with a growing `DynamicCache` and mask."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    device = input_ids.device
    context = getattr(model.config, "max_seq_len", None) or getattr(model.config, "max_position_embeddings", None)
    if context is not None and length + sampling.max_new_tokens > context:
        raise ValueError(f"prompt ({length}) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model's "
                         f"context of {context} tokens")
    pad = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None else 0
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: plain causal attention, no mask to grow
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None else \
        torch.arange(length, device=device).expand(batch, -1)
    rows = torch.arange(batch, device=device)
    seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    seen[rows[:, None].expand_as(input_ids)[real], input_ids[real]] = True
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    counts = torch.zeros(batch, model.config.vocab_size, device=device) \
        if sampling.presence_penalty or sampling.frequency_penalty else None
    bias = None
    if sampling.logit_bias:
        bias = torch.zeros(model.config.vocab_size, device=device)
        bias[list(sampling.logit_bias)] = torch.tensor(list(sampling.logit_bias.values()), device=device)
    static = isinstance(model, MateConvForCausalLM)
    compiled = static and (compile if compile is not None else device.type == "cuda")
    step = compiled_decode_step(device.type) if compiled else decode_step
    cache = take_cache(model, batch) if compiled else new_cache(model, batch, length + sampling.max_new_tokens)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        if static:
            cache.start_decoding(attention_mask)
        for index in range(sampling.max_new_tokens):
            if index and static:
                if compiled:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are no longer read
                logits = step(model, cache, token)
            elif index:
                positions = positions[:, -1:] + 1
                if attention_mask is not None:
                    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
                logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=positions,
                               cache=cache, use_cache=True).logits[:, -1]
            logits = adjust_logits(logits, counts, bias, sampling)
            if constraint is not None:
                logits = constraint.mask(logits)
            token = next_tokens(logits, seen, sampling, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            if constraint is not None:
                constraint.advance(token)
            yield token
            if eos_token_id is not None:
                finished |= token == eos_token_id
                if bool(finished.all()):
                    return
            seen[rows, token] = True
            if counts is not None:
                counts[rows, token] += 1
    finally:
        if compiled:
            give_back(model, cache)


def generate_tokens(model, input_ids: torch.Tensor, max_new_tokens: int = 256, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                    eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
                    pad_token_id: int | None = None, generator: torch.Generator | None = None,
                    compile: bool | None = None, constraint=None) -> torch.Tensor:
    """[B, L] prompt ids -> [B, L + n] prompt plus generated ids, n <= max_new_tokens (fewer when every row ended
    with EOS; a row that ended early is filled with pad_token_id, default the EOS id). compile and constraint: see
    `iter_tokens`."""
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    tokens = list(iter_tokens(model, input_ids, sampling, attention_mask, eos_token_id, pad_token_id, generator,
                              compile, constraint))
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


def detokenize(tokenizer, token_ids: Iterable[int], context: Sequence[int] = ()) -> Iterator[str]:
    """Text pieces for a stream of token ids; "".join(pieces) == tokenizer.decode(all ids, skip_special_tokens=True)
    but for a character left incomplete at the end, whose bytes are dropped (as vLLM and OpenAI drop them).

    A piece is released only when the text decodes cleanly (a multi-byte character split across tokens waits for
    its last byte). The pending tokens are decoded together with the previous piece's tokens as context, so
    tokenizers that strip a leading space from a lone word still decode correctly. `context`: the prompt the ids
    continue; its last tokens are decoded with the first ids, so bytes that complete a character the prompt left
    incomplete add no second U+FFFD.
    """
    ids = [int(token_id) for token_id in context[-4:]]  # enough for a character of 4 bytes, one per token
    prefix, emitted = 0, len(ids)  # ids[prefix:emitted] is context already released; ids[emitted:] are pending
    for token_id in token_ids:
        ids.append(int(token_id))
        before = tokenizer.decode(ids[prefix:emitted], skip_special_tokens=True)
        now = tokenizer.decode(ids[prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            yield now[len(before):]
            prefix, emitted = emitted, len(ids)
    tail = tokenizer.decode(ids[prefix:], skip_special_tokens=True)[len(tokenizer.decode(ids[prefix:emitted],
                                                                                       skip_special_tokens=True)):]
    tail = tail.rstrip("\ufffd")  # pending tokens always end inside a character (else they would be released)
    if tail:
        yield tail


def stream_text(model, tokenizer, prompt_ids, eos_token_id: int | None = None,
                generator: torch.Generator | None = None, compile: bool | None = None, **sampling) -> Iterator[str]:
    """Decoded text pieces of one reply as they are generated (stops at EOS, which is not emitted).

    prompt_ids: list of ids or a [1, L] / [L] tensor. sampling: SamplingConfig fields (max_new_tokens, temperature,
    top_p, top_k, repetition_penalty). eos_token_id defaults to the tokenizer's; compile: see `iter_tokens`.
    """
    device = next(model.parameters()).device
    input_ids = torch.as_tensor(prompt_ids, device=device).long().view(1, -1)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    tokens = iter_tokens(model, input_ids, SamplingConfig(**sampling), eos_token_id=eos, generator=generator,
                         compile=compile)
    ids = (int(token) for token in tokens)
    yield from detokenize(tokenizer, _until(ids, eos), context=input_ids[0].tolist())


def _until(ids: Iterator[int], stop: int | None) -> Iterator[int]:
    for token in ids:
        if token == stop:
            return
        yield token


__all__ = ["KVCache", "SamplingConfig", "adjust_logits", "apply_repetition_penalty", "decode_step", "detokenize",
           "filter_top_k_top_p", "generate_tokens", "iter_tokens", "next_tokens", "stream_text"]
