"""TrainConfig: every training flag of stages 4, 5 and 9, read from YAML files, `--overrides key=value` and `--key value`.

    python 4.pretrain.py configs/pretrain_tiny.yaml --overrides learning_rate=2e-5 batch_size=32 --use_moe
    python 4.pretrain.py --dim 256 --n_layers 4 --max_steps 100

Later sources win: stage defaults < YAML file < `--key value` flags and `--overrides` (in command-line order).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mateconv.files import write_atomic

CHOICES = {
    "optimizer": ("adamw", "muon"),
    "tracker": ("wandb", "tensorboard", "none"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "engine": ("auto", "deepspeed", "torch"),
    "zero_stage": (0, 1, 2, 3),
    "wandb_watch": ("", "gradients", "parameters", "all"),
}
# Names the seeds use for the same flags.
ALIASES = {"lr": "learning_rate", "save_interval": "save_interval_steps", "ds_config_path": "ds_config",
           "loss_type": "dpo_loss_type", "label_smoothing": "dpo_label_smoothing", "kl_coef": "dpo_kl_coef",
           "sft_coef": "dpo_sft_coef"}
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key."""


@dataclass
class TrainConfig:
    # model shape (ignored when init_from names a Hugging Face model)
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    max_seq_len: int = 512
    vocab_size: int = 6400
    rope_theta: float = 1e6
    dropout: float = 0.0
    norm_eps: float = 1e-5
    multiple_of: int = 64
    hidden_dim: int | None = None
    flash_attn: bool = True
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    aux_loss_alpha: float = 0.1
    seq_aux: bool = True
    norm_topk_prob: bool = True
    # data
    data_path: str = "out/tokens/pretrain/train"
    val_data_path: str = "out/tokens/pretrain/val"
    tokenizer_path: str = "out/tokenizer"
    num_workers: int = 2
    eval_batches: int = 50
    # optimisation
    batch_size: int = 32
    accumulation_steps: int = 1
    learning_rate: float = 5e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    epochs: int = 1
    max_steps: int = 0
    grad_clip: float = 1.0
    warmup_iters: int = 0
    warmup_ratio: float = 0.0  # > 0: warm up for this fraction of the run instead of warmup_iters
    gradient_checkpointing: bool = False
    seed: int = 42
    # hardware and parallelism
    dtype: str = "auto"
    device: str = "auto"
    engine: str = "auto"
    zero_stage: int = 0
    ds_config: str = ""
    offload_optimizer: bool = False
    offload_param: bool = False
    local_rank: int = -1
    peak_flops: float = 0.0
    # checkpoints, evaluation, logging
    out_dir: str = "out/pretrain"
    save_interval_steps: int = 1000
    keep_checkpoint_max: int = 3
    resume: str = "auto"
    eval_interval: int = 500
    log_interval: int = 10
    tracker: str = "wandb"
    wandb_project: str = "mateconv"
    wandb_run_name: str = ""
    wandb_watch: str = ""
    wandb_watch_freq: int = 100  # in backward passes (micro-batches)
    wandb_log_model: bool = False
    wandb_log_code: bool = False
    # initialisation and LoRA
    init_from: str = ""
    use_lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # DPO (stage 9)
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    dpo_kl_coef: float = 0.0
    dpo_sft_coef: float = 0.0
    ref_model_path: str = ""
    precompute_ref: bool = False
    forget_data_paths: list[str] = field(default_factory=lambda: ["out/tokens/pretrain/val", "out/tokens/sft/val"])

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                named = ", ".join(str(value) if value != "" else '""' for value in allowed)
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {named}")
        positive = ("batch_size", "accumulation_steps", "max_seq_len", "save_interval_steps", "keep_checkpoint_max",
                    "eval_interval", "log_interval", "epochs", "wandb_watch_freq")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_iters", "num_workers", "grad_clip", "eval_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage < 1:
            raise ConfigError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.wandb_watch and self.zero_stage == 3:
            raise ConfigError("wandb_watch is not supported with zero_stage 3 (parameters are partitioned, so the "
                              "hooks would see empty tensors); use zero_stage 0-2 or drop wandb_watch")

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.batch_size * self.max_seq_len


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_type(name: str):
    return typing.get_type_hints(TrainConfig)[name]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELDS) + list(ALIASES), n=1)
    hint = f"; did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _canonical(key: str) -> str:
    key = key.replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FIELDS:
        raise _unknown(key)
    return key


def convert(key: str, value):
    """`value` (a YAML value or a command-line string) as the type of field `key`, or ConfigError."""
    kind = _field_type(key)
    optional = isinstance(kind, types.UnionType) and type(None) in kind.__args__
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        kind = next(k for k in kind.__args__ if k is not type(None))
    expected = getattr(kind, "__name__", str(kind))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(kind) is list:
        expected = "list of strings"
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_args(argv: list[str]) -> list[tuple[str, object]]:
    """Command-line tokens -> ordered (key, raw value) pairs; a YAML path expands to its keys."""
    pairs: list[tuple[str, object]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            if not token.endswith((".yaml", ".yml")):
                raise ConfigError(f"unexpected argument '{token}' (a config file must end in .yaml)")
            pairs += list(load_yaml(token).items())
            i += 1
            continue
        name, has_value, inline = token[2:].partition("=")
        if name == "config":
            path = inline if has_value else (argv[i + 1] if i + 1 < len(argv) else "")
            pairs += list(load_yaml(path).items())
            i += 1 if has_value else 2
            continue
        if name == "overrides":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                key, eq, value = argv[i].partition("=")
                if not eq:
                    raise ConfigError(f"override '{argv[i]}' must look like key=value")
                pairs.append((key, value))
                i += 1
            continue
        key = _canonical(name)
        if has_value:
            pairs.append((key, inline))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((key, argv[i + 1]))
            i += 2
        elif _field_type(key) is bool:
            pairs.append((key, True))  # a bare boolean flag: --use_moe
            i += 1
        else:
            raise ConfigError(f"--{name} needs a value")
    return pairs


def parse_config(argv: list[str], defaults: dict | None = None) -> TrainConfig:
    """A TrainConfig from stage defaults and command-line tokens (YAML paths, flags, --overrides)."""
    values: dict = {}
    for key, value in [*(defaults or {}).items(), *parse_args(argv)]:
        key = _canonical(key)
        values[key] = convert(key, value)
    if values.get("local_rank", -1) < 0 and "LOCAL_RANK" in os.environ:
        values["local_rank"] = int(os.environ["LOCAL_RANK"])
    return TrainConfig(**values)


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """The resolved config as YAML (atomic write); loadable again with `parse_config([path])`."""
    write_atomic(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))


def help_text() -> str:
    lines = ["flags (also YAML keys and --overrides key=value):"]
    hints = typing.get_type_hints(TrainConfig)
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = getattr(hints[name], "__name__", str(hints[name]))
        lines.append(f"  --{name:<24} {kind:<10} default {default!r}")
    return "\n".join(lines)
