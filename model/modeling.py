"""MateConv decoder: RoPE, RMSNorm, grouped-query attention (SDPA or plain math), SwiGLU or MoE FFN, tied LM head.

Parameter names are Hugging Face Llama's, so a dense model exports to `LlamaForCausalLM` by a strict state-dict load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import MateConvConfig
from .moe import MoEFeedForward, SwiGLU, plain_linears


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, T, 1, head_dim] for positions [B, T] (half-split layout: frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: MateConvConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.dropout = config.dropout
        self.use_sdpa = config.flash_attn
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.q_norm, self.k_norm = ((RMSNorm(self.head_dim, config.norm_eps), RMSNorm(self.head_dim, config.norm_eps))
                                    if config.qk_norm else (None, None))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache=None) -> torch.Tensor:
        """mask: None means plain causal attention (or a single query attending to every key the cache returns);
        a boolean mask marks the keys each query sees, a float one is added to the scores (0 or -inf), a BlockMask
        runs FlexAttention."""
        batch, seq, _ = x.shape
        heads = self.project_qkv(x).view(batch, seq, -1, self.head_dim)  # [B, T, H + 2 * KV, head_dim]
        qk = heads[:, :, : self.n_heads + self.n_kv_heads]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, : self.n_heads]), self.k_norm(qk[:, :, self.n_heads:])), dim=2)
        qk = apply_rope(qk, *rope)  # rotate q and k in one pass
        q = qk[:, :, : self.n_heads].transpose(1, 2)
        k = qk[:, :, self.n_heads:].transpose(1, 2)
        v = heads[:, :, self.n_heads + self.n_kv_heads:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, BlockMask):
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        elif self.use_sdpa:
            grouped = mask is None or not q.is_cuda
            if not grouped:  # CUDA's masked kernels take no grouped heads (else SDPA falls back to plain math)
                k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=mask is None and seq > 1, enable_gqa=grouped)
        else:
            out = self.math_attention(q, k, v, mask, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """One matmul against the concatenated q/k/v weights (about 1.5x faster than three on CPU). Under ZeRO-3
        the weights are only gathered inside each projection's own forward, and LoRA adds its adapters there, so
        then they run separately."""
        if hasattr(self.q_proj.weight, "ds_id") or not plain_linears(self.q_proj, self.k_proj, self.v_proj):
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return F.linear(x, torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))

    def math_attention(self, q, k, v, mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
        repeats = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
        if mask is None and q.shape[2] > 1:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        probs = F.dropout(scores.softmax(dim=-1).to(q.dtype), p=dropout, training=dropout > 0)
        return probs @ v


class MateConvDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MateConvConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.is_moe = config.use_moe
        self.mlp = MoEFeedForward(config) if config.use_moe else SwiGLU(config.dim, config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope, mask, cache=None,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        if self.is_moe:
            ffn, aux = self.mlp(self.post_attention_layernorm(x), token_mask)
        else:
            ffn, aux = self.mlp(self.post_attention_layernorm(x)), None
        return x + self.dropout(ffn), aux


def attention_mask_4d(attention_mask: torch.Tensor | None, past: int, seq: int,
                      keys: int | None = None) -> torch.Tensor | None:
    """Boolean [B, 1, T, keys] mask, or None when plain causal attention is exact for every real token.

    `keys` is how many keys attention gets: past + seq, unless a static cache hands it all its slots (those past the
    sequence are masked as later positions). Right padding needs no mask: real tokens come first and attend only
    backwards, and padded positions carry no labels. A padded query always sees itself, so no row of the mask is
    empty.
    """
    total = past + seq
    keys = total if keys is None else keys
    if attention_mask is not None and not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        real = attention_mask[:, :total].bool()
        real = torch.cat((real, real.new_ones(real.shape[0], keys - total)), dim=1)
    elif (past == 0 or seq == 1) and keys == total:
        return None
    else:
        real = None
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(keys, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]
    if real is not None:
        mask = mask & real[:, None, None, :] | (key_pos == query_pos)[None, None]
    return mask


def static_capacity(cache) -> int | None:
    """The slots of a transformers static cache (`generate(cache_implementation="static")`), all of which its
    `update` hands attention, filled or not; None for a cache that grows with the sequence."""
    for name in ("get_max_length", "get_max_cache_shape"):  # transformers 5, then 4
        method = getattr(cache, name, None)
        if method is not None:
            length = method()
            return length if length is not None and length > 0 else None
    return None


def flex_attention_runs(device: torch.device) -> bool:
    """Whether FlexAttention runs here as it should: compiled into one kernel, with its backward, which exists on
    CUDA only (eager it runs unfused, slower than SDPA; on CPU it has no backward)."""
    return device.type == "cuda" and torch.compiler.is_compiling()


def packed_documents_mask(position_ids: torch.Tensor, flex: bool = False) -> torch.Tensor | BlockMask:
    """Causal mask within documents, for rows packed with several: a document begins where its position id is 0,
    and no token attends to an earlier document. Boolean [B, 1, T, T], or with `flex` the same rule as a
    FlexAttention BlockMask (built inside torch.compile, whose kernel then skips the blocks across documents)."""
    document = (position_ids == 0).cumsum(-1)
    batch, seq = position_ids.shape
    if flex:
        def same_document_causal(b, h, query, key):
            return (document[b, query] == document[b, key]) & (query >= key)
        return create_block_mask(same_document_causal, batch, None, seq, seq, device=position_ids.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return (document[:, None, :, None] == document[:, None, None, :]) & causal


# transformers 5.24 renamed the output's KV cache field from `past_key_values` to `cache`; a GPU image may ship older
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class MateConvCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the MoE balance loss (summed over layers; already included in `loss`)."""

    aux_loss: torch.Tensor | None = None


class MateConvPreTrainedModel(PreTrainedModel):
    config: MateConvConfig
    config_class = MateConvConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MateConvDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class MateConvModel(MateConvPreTrainedModel):
    def __init__(self, config: MateConvConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(MateConvDecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False,
                token_mask: torch.Tensor | None = None, output_hidden_states: bool = False,
                inputs_embeds: torch.Tensor | None = None):
        """-> (hidden states [B, T, dim], cache or None, summed MoE aux loss or None, all hidden states or None).

        All hidden states, with `output_hidden_states`, as transformers gives them: each layer's input, then the
        final (normed) output, n_layers + 1 tensors.

        token_mask [B, T] marks the real tokens (1) among padding (0) for the MoE expert load and balance loss only;
        attention is left as it is. Without it a 2-D attention_mask serves, without either every position counts."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass either input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = x.shape[:2]
        if token_mask is None and attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq:]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if attention_mask is not None and attention_mask.dim() == 4:
            # the caller's own [B, 1, T, keys] mask, boolean or added to the scores (generation's fixed-shape decode
            # step): no cache length is read, since a Python int that changes per call would change a compiled graph
            if position_ids is None:
                raise ValueError("a 4-D attention_mask needs position_ids")
            mask = attention_mask
        else:
            past = cache.get_seq_length() if cache is not None else 0
            if past + seq > self.config.max_seq_len:
                raise ValueError(f"sequence of {past + seq} tokens exceeds max_seq_len {self.config.max_seq_len}")
            capacity = static_capacity(cache)
            # e.g. training rows (a static cache's generate also sends position ids alone: one causal sequence)
            packed = position_ids is not None and attention_mask is None and past == 0 and capacity is None
            if position_ids is None:
                if attention_mask is not None and past + seq == attention_mask.shape[1]:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
                else:
                    position_ids = torch.arange(past, past + seq, device=x.device).expand(batch, -1)
            flex = self.config.flex_attention and flex_attention_runs(position_ids.device)
            mask = (packed_documents_mask(position_ids, flex) if packed else
                    attention_mask_4d(attention_mask, past, seq, capacity))
        x = self.dropout(x)
        rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        aux_total, states = None, []
        for layer in self.layers:
            if output_hidden_states:
                states.append(x)
            x, aux = layer(x, rope, mask, cache, token_mask)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        x = self.norm(x)
        return x, (cache if use_cache else None), aux_total, (tuple(states) + (x,) if output_hidden_states else None)


# `generate`'s defaults, saved in generation_config.json: sampling, as chat models ship (seed 001 calls
# `model.generate(ids, temperature=0.7, top_p=0.9)`, which greedy defaults would ignore); do_sample=False is greedy.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


class MateConvForCausalLM(MateConvPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MateConvConfig):
        super().__init__(config)
        self.model = MateConvModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.post_init()
        self.generation_config.update(**SAMPLING_DEFAULTS)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache=None, use_cache: bool | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                num_items_in_batch: int | torch.Tensor | None = None, past_key_values=None,
                token_mask: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> MateConvCausalLMOutput | tuple:
        """labels use the Hugging Face convention (same positions as input_ids, shifted here, -100 ignored).
        `logits_to_keep=n` computes logits for the last n positions only (0 = all). `inputs_embeds` [B, T, dim]
        replaces input_ids (prompt tuning, `generate(inputs_embeds=...)`). `token_mask` [B, T] (1 on real
        tokens, 0 on padding) keeps padding out of the MoE expert load and balance loss (see MateConvModel.forward).

        The KV cache arrives as `cache` (transformers >= 5.24 `generate`) or `past_key_values` (older releases and
        older callers); dropping either into **kwargs would silently decode without context. The same goes for
        `output_hidden_states` (given), `return_dict=False` (a plain tuple of the fields that are set, as transformers'
        models give it) and `output_attentions` (refused: the fused kernels keep no weights)."""
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
        if output_attentions:
            raise ValueError("output_attentions is not supported: MateConv's attention runs in fused kernels that "
                             "return no attention weights")
        cache = cache if cache is not None else past_key_values
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden, cache, aux, states = self.model(input_ids, attention_mask, position_ids, cache, use_cache, token_mask,
                                                output_hidden_states, inputs_embeds)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
            if aux is not None and self.training:  # the balance loss trains the router; an evaluation is pure CE
                loss = loss + aux
        output = MateConvCausalLMOutput(loss=loss, logits=logits, aux_loss=aux, hidden_states=states,
                                        **{CACHE_FIELD: cache})
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    def expert_load(self) -> torch.Tensor | None:
        """[n_layers, n_routed_experts] shares of the real tokens' picks per expert in the last forward (rows sum to
        1; padding that a token_mask or attention_mask marks is not counted); None if dense."""
        if not self.config.use_moe:
            return None
        loads = [layer.mlp.last_load for layer in self.model.layers]
        return None if any(load is None for load in loads) else torch.stack(loads)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; mean over labels != -100 (or sum / num_items)."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten().to(logits.device), ignore_index=-100,
                           reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch
