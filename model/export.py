"""A dense MateConv model as a standard Hugging Face model with the same parameter names (a strict state-dict load):
`LlamaForCausalLM`, or `Qwen3ForCausalLM` when it normalises each head's queries and keys (`qk_norm`), which Llama
does not. `python -m mateconv.export` writes it out with its tokenizer and generation settings."""
from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from .config import ConfigError
from .modeling import MateConvForCausalLM


def standard_fields(model: MateConvForCausalLM) -> dict:
    """The config fields Llama and Qwen3 share, from a dense MateConv model's config."""
    config = model.config
    if config.use_moe:
        raise ConfigError("only dense MateConv models export to a standard architecture (this one has use_moe=True)")
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, hidden_act="silu",
        attention_dropout=config.dropout, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def llama_config(model: MateConvForCausalLM) -> LlamaConfig:
    if model.config.qk_norm:
        raise ConfigError("this model normalises each head's queries and keys (qk_norm), which Llama does not: "
                          "export it as Qwen3")
    return LlamaConfig(**standard_fields(model))


def qwen3_config(model: MateConvForCausalLM) -> Qwen3Config:
    if not model.config.qk_norm:
        raise ConfigError("Qwen3 normalises each head's queries and keys and this model does not (qk_norm=False): "
                          "export it as Llama")
    return Qwen3Config(**standard_fields(model), use_sliding_window=False)


def to_llama(model: MateConvForCausalLM) -> LlamaForCausalLM:
    """A LlamaForCausalLM with this model's weights (same device and dtype)."""
    return twin(LlamaForCausalLM(llama_config(model)), model)


def to_qwen3(model: MateConvForCausalLM) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM with this model's weights (same device and dtype); for models with `qk_norm`."""
    return twin(Qwen3ForCausalLM(qwen3_config(model)), model)


def twin(standard, model: MateConvForCausalLM):
    parameter = next(model.parameters())
    standard = standard.to(device=parameter.device, dtype=parameter.dtype)
    standard.load_state_dict(model.state_dict(), strict=True)
    return standard.train(model.training)
