"""A MateConv model as a standard Hugging Face model that computes the same function (a strict state-dict load).

Dense: `LlamaForCausalLM` with the same parameter names, or `Qwen3ForCausalLM` when it normalises each head's queries
and keys (`qk_norm`), which Llama does not. Mixture-of-Experts (softmax router, top k, optionally renormalised):
`Qwen2MoeForCausalLM` (one shared expert behind a sigmoid gate), `Qwen3MoeForCausalLM` with `qk_norm` and no shared
experts, `Qwen3NextForCausalLM` (all layers full attention) with both, as the MoE preset. `python -m mateconv.export`
writes it out with its tokenizer and generation settings.
"""
from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM)

from .config import ConfigError
from .modeling import MateConvForCausalLM


def dense_fields(model: MateConvForCausalLM) -> dict:
    if model.config.use_moe:
        raise ConfigError("Llama and Qwen3 have no experts and this model has use_moe=True")
    return standard_fields(model)


def standard_fields(model: MateConvForCausalLM) -> dict:
    """The config fields Llama, Qwen3 and the Qwen MoE models share, from a MateConv model's config."""
    config = model.config
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, hidden_act="silu",
        attention_dropout=config.dropout, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def llama_config(model: MateConvForCausalLM) -> LlamaConfig:
    fields = dense_fields(model)
    if model.config.qk_norm:
        raise ConfigError("this model normalises each head's queries and keys (qk_norm), which Llama does not: "
                          "export it as Qwen3")
    return LlamaConfig(**fields)


def qwen3_config(model: MateConvForCausalLM) -> Qwen3Config:
    fields = dense_fields(model)
    if not model.config.qk_norm:
        raise ConfigError("Qwen3 normalises each head's queries and keys and this model does not (qk_norm=False): "
                          "export it as Llama")
    return Qwen3Config(**fields, use_sliding_window=False)


def standard_architecture(config) -> str:
    """The name (a key of TO_STANDARD) of the standard architecture computing exactly what a model of this config
    computes."""
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if config.qk_norm:
        return "qwen3next" if config.n_shared_experts else "qwen3moe"
    return "qwen2moe"


def to_llama(model: MateConvForCausalLM) -> LlamaForCausalLM:
    """A LlamaForCausalLM with this model's weights (same device and dtype)."""
    return twin(LlamaForCausalLM(llama_config(model)), model)


def to_qwen3(model: MateConvForCausalLM) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM with this model's weights (same device and dtype); for models with `qk_norm`."""
    return twin(Qwen3ForCausalLM(qwen3_config(model)), model)


def moe_fields(model: MateConvForCausalLM) -> dict:
    """The config fields of the Qwen MoE models: every layer's FFN is a mixture of experts of our width."""
    config = model.config
    if not config.use_moe:
        raise ConfigError("the Qwen MoE architectures have experts and this model does not (use_moe=False)")
    if config.scoring_func != "softmax":
        raise ConfigError(f"the Qwen MoE routers score experts by softmax, this model by {config.scoring_func}")
    # We renormalise the top-k weights only when k > 1 (a single weight would become 1); Qwen's flag does it always.
    renormalised = config.norm_topk_prob and config.num_experts_per_tok > 1
    return dict(standard_fields(model), num_experts=config.n_routed_experts,
                num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.hidden_dim,
                norm_topk_prob=renormalised, decoder_sparse_step=1, mlp_only_layers=[],
                router_aux_loss_coef=config.aux_loss_alpha)


def qwen2_moe_config(model: MateConvForCausalLM) -> Qwen2MoeConfig:
    config = model.config
    if config.qk_norm:
        raise ConfigError("this model normalises each head's queries and keys (qk_norm), which Qwen2-MoE does not")
    return Qwen2MoeConfig(**moe_fields(model), qkv_bias=True, shared_expert_intermediate_size=shared_width(config),
                          use_sliding_window=False)


def shared_width(config) -> int:
    """The width of Qwen's one shared expert: ours side by side (one expert's width when we have none)."""
    return config.hidden_dim * max(config.n_shared_experts, 1)


def qwen3_moe_config(model: MateConvForCausalLM) -> Qwen3MoeConfig:
    config = model.config
    if not config.qk_norm:
        raise ConfigError("Qwen3-MoE normalises each head's queries and keys and this model does not "
                          "(qk_norm=False)")
    if config.n_shared_experts:
        raise ConfigError(f"this model has shared experts (n_shared_experts={config.n_shared_experts}), which "
                          "Qwen3-MoE does not")
    return Qwen3MoeConfig(**moe_fields(model), attention_bias=False, use_sliding_window=False)


def qwen3_next_config(model: MateConvForCausalLM) -> Qwen3NextConfig:
    """Qwen3-Next with every layer full attention (none of its linear-attention layers) and rotary over the whole
    head: per-head q/k norms and a sigmoid-gated shared expert, which Qwen3-MoE lacks."""
    config = model.config
    if not (config.qk_norm and config.n_shared_experts):
        raise ConfigError("the Qwen3-Next export is for models with both qk_norm and shared experts, this one has "
                          f"qk_norm={config.qk_norm}, n_shared_experts={config.n_shared_experts}")
    return Qwen3NextConfig(**moe_fields(model), shared_expert_intermediate_size=shared_width(config),
                           layer_types=["full_attention"] * config.n_layers, partial_rotary_factor=1.0,
                           attention_bias=False)


def to_qwen2_moe(model: MateConvForCausalLM) -> Qwen2MoeForCausalLM:
    """A Qwen2MoeForCausalLM computing this model's function (same device and dtype); for models without `qk_norm`."""
    config = qwen2_moe_config(model)
    state = qwen_moe_state_dict(model, shared_expert=True)
    for index in range(model.config.n_layers):  # Qwen2-MoE's q/k/v projections have biases, ours none
        for name, rows in (("q", config.num_attention_heads), ("k", config.num_key_value_heads),
                           ("v", config.num_key_value_heads)):
            state[f"model.layers.{index}.self_attn.{name}_proj.bias"] = model.lm_head.weight.new_zeros(
                rows * config.head_dim)
    return twin(Qwen2MoeForCausalLM(config), model, state)


def to_qwen3_moe(model: MateConvForCausalLM) -> Qwen3MoeForCausalLM:
    """A Qwen3MoeForCausalLM computing this model's function; for models with `qk_norm` and no shared experts."""
    return twin(Qwen3MoeForCausalLM(qwen3_moe_config(model)), model, qwen_moe_state_dict(model, shared_expert=False))


def to_qwen3_next(model: MateConvForCausalLM) -> Qwen3NextForCausalLM:
    """A Qwen3NextForCausalLM computing this model's function; for models with `qk_norm` and shared experts.

    Its attention multiplies each head's output by sigmoid(gate) with the gate projected beside the queries (each
    head's query rows, then its gate rows): zero gate rows make it 1/2, so o_proj is doubled. Its RMSNorms scale by
    1 + weight, so each norm weight is ours minus 1."""
    config = qwen3_next_config(model)
    state = qwen_moe_state_dict(model, shared_expert=True)
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}.self_attn."
        queries = state[prefix + "q_proj.weight"].view(config.num_attention_heads, config.head_dim, -1)
        state[prefix + "q_proj.weight"] = torch.cat((queries, torch.zeros_like(queries)), dim=1).flatten(0, 1)
        state[prefix + "o_proj.weight"] = 2 * state[prefix + "o_proj.weight"]
    for name in state:
        if name.endswith("norm.weight"):
            state[name] = state[name] - 1
    return twin(Qwen3NextForCausalLM(config), model, state)


def qwen_moe_state_dict(model: MateConvForCausalLM, shared_expert: bool) -> dict[str, torch.Tensor]:
    """Our parameters under the Qwen MoE names: each layer's experts stacked ([E, 2*hidden, dim] gate then up rows,
    [E, dim, hidden] down). With `shared_expert` (Qwen2-MoE, Qwen3-Next) also its one shared expert: ours side by
    side (a wider SwiGLU, as we compute them; all zero when we have none) behind a gate that is always 1/2 (see
    shared_expert_gate), its down projection doubled."""
    state = {name: tensor for name, tensor in model.state_dict().items() if ".mlp." not in name}
    for index, layer in enumerate(model.model.layers):
        prefix, moe = f"model.layers.{index}.mlp.", layer.mlp
        state[prefix + "gate.weight"] = moe.gate.weight
        state[prefix + "experts.gate_up_proj"] = torch.stack(
            [torch.cat((expert.gate_proj.weight, expert.up_proj.weight)) for expert in moe.experts])
        state[prefix + "experts.down_proj"] = torch.stack([expert.down_proj.weight for expert in moe.experts])
        if shared_expert:
            state.update({prefix + name: tensor for name, tensor in shared_expert_tensors(model, layer).items()})
    return state


def shared_projections(model: MateConvForCausalLM, layer) -> dict[str, torch.Tensor]:
    """A layer's shared experts side by side as one SwiGLU, {gate_proj, up_proj, down_proj} weights (one expert's
    width of zeros where the model has none)."""
    config, shared = model.config, layer.mlp.shared_experts
    if shared:
        return {name: getattr(shared, name).weight for name in ("gate_proj", "up_proj", "down_proj")}
    zeros, width = layer.mlp.gate.weight.new_zeros, shared_width(config)
    return {"gate_proj": zeros(width, config.dim), "up_proj": zeros(width, config.dim),
            "down_proj": zeros(config.dim, width)}


def shared_expert_tensors(model: MateConvForCausalLM, layer) -> dict[str, torch.Tensor]:
    projections = shared_projections(model, layer)
    projections["down_proj"] = 2 * projections["down_proj"]
    return {**{f"shared_expert.{name}.weight": weight for name, weight in projections.items()},
            "shared_expert_gate.weight": shared_expert_gate(layer.post_attention_layernorm.weight)}


def shared_expert_gate(norm_weight: torch.Tensor) -> torch.Tensor:
    """Qwen's shared-expert gate row w, with sigmoid(w.x) exactly 1/2 for the normed hidden state x.

    Not w = 0: llama.cpp computes this sigmoid as silu(z)/z, which is 0/0 at z = 0. w picks x's component with the
    largest norm weight (x_j = 0 only if the hidden state's is), scaled by 1e-20: |z| < 1e-7 for any |x_j| below
    1e13, where sigmoid(z) is 1/2 to float32 rounding, and z stays a normal float (no flush to 0) for |x_j| above
    1e-18. (Saved in float16, w becomes 0, and transformers' sigmoid(0) is exactly 1/2.)
    """
    gate = norm_weight.new_zeros(1, norm_weight.numel())
    gate[0, norm_weight.abs().argmax()] = 1e-20
    return gate


def twin(standard, model: MateConvForCausalLM, state: dict[str, torch.Tensor] | None = None):
    """`standard` holding `state` (default: our own state dict, whose names it shares), on our device and dtype."""
    parameter = next(model.parameters())
    standard = standard.to(device=parameter.device, dtype=parameter.dtype)
    standard.load_state_dict(model.state_dict() if state is None else state, strict=True)
    return standard.train(model.training)


TO_STANDARD = {"llama": to_llama, "qwen3": to_qwen3, "qwen2moe": to_qwen2_moe, "qwen3moe": to_qwen3_moe,
               "qwen3next": to_qwen3_next}
