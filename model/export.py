"""A dense MateConv model as Hugging Face `LlamaForCausalLM` (same parameter names: a strict state-dict load).
`python -m mateconv.export` writes it out with its tokenizer and generation settings."""
from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from .config import ConfigError
from .modeling import MateConvForCausalLM


def llama_config(model: MateConvForCausalLM) -> LlamaConfig:
    config = model.config
    if config.use_moe:
        raise ConfigError("only dense MateConv models export to LlamaForCausalLM (this one has use_moe=True)")
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, hidden_act="silu",
        attention_dropout=config.dropout, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


def to_llama(model: MateConvForCausalLM) -> LlamaForCausalLM:
    """A LlamaForCausalLM with this model's weights (same device and dtype)."""
    parameter = next(model.parameters())
    llama = LlamaForCausalLM(llama_config(model)).to(device=parameter.device, dtype=parameter.dtype)
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama.train(model.training)
