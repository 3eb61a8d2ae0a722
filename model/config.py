"""MateConvConfig: the model's hyperparameters (dense or Mixture-of-Experts), plus the seed size presets."""
from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig


class ConfigError(ValueError):
    """A MateConv config field has an invalid value."""


SCORING_FUNCS = ("softmax",)
MOE_IMPLS = ("auto", "grouped", "loop")


class MateConvConfig(PretrainedConfig):
    """LLaMA-style decoder config (field names follow the MiniMind seeds).

    `hidden_dim=None` derives the SwiGLU width from `dim`: 2/3 of 4*dim rounded up to a multiple of `multiple_of`
    (dim 512 -> 1408). Hugging Face's standard names (`hidden_size`, `num_hidden_layers`, ...) alias these fields.
    """

    model_type: ClassVar[str] = "mateconv"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache", "past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_seq_len",
        "intermediate_size": "hidden_dim",
        "rms_norm_eps": "norm_eps",
    }

    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    vocab_size: int = 6400
    max_seq_len: int = 512
    rope_theta: float = 1e6
    dropout: float = 0.0
    norm_eps: float = 1e-5
    multiple_of: int = 64
    hidden_dim: int | None = None
    flash_attn: bool = True
    document_mask: bool = True  # training rows packed with several documents: each attends only to itself
    # compiled on CUDA, that per-document mask as a FlexAttention block mask (blocks across documents are skipped)
    flex_attention: bool = False
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (MiniMind's and Qwen3's attention)
    initializer_range: float = 0.02
    # Mixture of Experts (DeepSeek style)
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.1
    seq_aux: bool = True
    norm_topk_prob: bool = True
    moe_impl: str = "auto"  # how the routed experts run: grouped GEMM, a loop over experts, or auto (model/moe.py)
    # Hugging Face generation / embedding conventions (token ids fixed by the tokenizer, see docs/design.md)
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        if self.hidden_dim is None and self.multiple_of:  # multiple_of 0: check_config names it
            self.hidden_dim = derive_hidden_dim(self.dim, self.multiple_of)
        super().__post_init__(**kwargs)
        check_config(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def derive_hidden_dim(dim: int, multiple_of: int) -> int:
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def check_config(config: MateConvConfig) -> None:
    """Raise ConfigError naming the first invalid field."""
    positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "multiple_of", "hidden_dim")
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"MateConvConfig.{name} must be a positive integer, got {value!r}")
    if config.dim % config.n_heads:
        raise ConfigError(f"dim ({config.dim}) must be divisible by n_heads ({config.n_heads})")
    if config.head_dim % 2:
        raise ConfigError(f"head dim dim/n_heads ({config.head_dim}) must be even for RoPE")
    if config.n_heads % config.n_kv_heads:
        raise ConfigError(f"n_heads ({config.n_heads}) must be divisible by n_kv_heads ({config.n_kv_heads})")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")
    if config.flex_attention and (config.dropout or not config.flash_attn):
        raise ConfigError(f"flex_attention needs flash_attn and no dropout, got flash_attn={config.flash_attn}, "
                          f"dropout={config.dropout}")
    if config.initializer_range < 0:
        raise ConfigError(f"initializer_range must be >= 0, got {config.initializer_range}")
    if config.rope_theta <= 0 or config.norm_eps <= 0:
        raise ConfigError(f"rope_theta and norm_eps must be positive, got {config.rope_theta} and {config.norm_eps}")
    if config.use_moe:
        if config.n_routed_experts < 1:
            raise ConfigError(f"n_routed_experts must be >= 1, got {config.n_routed_experts}")
        if not 1 <= config.num_experts_per_tok <= config.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok ({config.num_experts_per_tok}) must be between 1 and "
                              f"n_routed_experts ({config.n_routed_experts})")
        if config.n_shared_experts < 0:
            raise ConfigError(f"n_shared_experts must be >= 0, got {config.n_shared_experts}")
    if config.aux_loss_alpha < 0:
        raise ConfigError(f"aux_loss_alpha must be >= 0, got {config.aux_loss_alpha}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # Hugging Face allows a list of eos ids
        value = getattr(config, name)
        if any(not 0 <= token < config.vocab_size for token in (value if isinstance(value, list) else [value])
               if token is not None):
            raise ConfigError(f"{name} must be a token id in [0, vocab_size {config.vocab_size}), got {value}")
    if config.moe_impl not in MOE_IMPLS:
        raise ConfigError(f"unknown moe_impl {config.moe_impl!r}; supported: {', '.join(MOE_IMPLS)}")
    if config.scoring_func not in SCORING_FUNCS:
        raise ConfigError(f"unknown scoring_func {config.scoring_func!r}; supported: {', '.join(SCORING_FUNCS)}")


# Seed sizes. Parameter counts (tied embeddings, vocab 6400) are checked by tests/test_model_core.py. All normalise
# each head's queries and keys (qk_norm, as MiniMind and Qwen3 do; dense ones export as Qwen3): at dim 512 it lowered
# held-out bits per byte by 0.10-0.18 (seq 512, two seeds) and 0.09 (seq 128) in BENCHMARKS.md's side-by-side with
# MiniMind.
PRESETS: dict[str, dict] = {
    # MateConv-0.02B: the MiniMind small dense model
    "mateconv-0.02b": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, qk_norm=True),
    # a wider dense model of the seeds' 768 width
    "mateconv-0.1b": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, qk_norm=True),
    # seed 004's ~0.1B MoE: MateConv-0.02B with each FFN replaced by 4 routed experts (top 2) + 1 shared expert,
    # so MoE and dense FFN compare at the same width
    "mateconv-0.1b-moe": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, qk_norm=True, use_moe=True,
                              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
}


def preset_config(name: str, **overrides) -> MateConvConfig:
    """A MateConvConfig for a named preset (see PRESETS), with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return MateConvConfig(**{**PRESETS[name], **overrides})
