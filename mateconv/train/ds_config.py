"""DeepSpeed config: pick a file from ds_configs/ and fill its "auto" placeholders from the TrainConfig."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mateconv.config import ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def default_ds_config_path(config: TrainConfig) -> Path:
    offload = config.offload_optimizer or config.offload_param
    if offload and config.zero_stage not in (2, 3):
        raise ConfigError("CPU offload configs exist for zero_stage 2 and 3")
    return DS_CONFIG_DIR / f"zero{config.zero_stage}{'_offload' if offload else ''}.json"


def auto_values(config: TrainConfig, dtype: torch.dtype, world_size: int, hidden: int) -> dict[str, object]:
    """Values for the "auto" keys, by dotted path."""
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.accumulation_steps,
        "train_batch_size": config.batch_size * config.accumulation_steps * world_size,
        "gradient_clipping": config.grad_clip,
        "bf16.enabled": dtype == torch.bfloat16,
        "fp16.enabled": dtype == torch.float16,
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.allgather_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }


def fill_auto(node, values: dict[str, object], path: str = ""):
    if isinstance(node, dict):
        return {key: fill_auto(value, values, f"{path}.{key}" if path else key) for key, value in node.items()}
    if node == "auto":
        if path not in values:
            raise ConfigError(f"DeepSpeed config key '{path}' is \"auto\" but MateConv has no value for it")
        return values[path]
    return node


def optimizer_section(config: TrainConfig) -> dict | None:
    """DeepSpeed builds the optimizer itself for Muon (its ZeRO-aware MuonWithAuxAdam) and for CPU offload (its
    CPUAdam); otherwise the engine passes its own torch optimizer."""
    betas = [config.adam_beta1, config.adam_beta2]
    if config.optimizer == "muon":
        return {"type": "Muon", "params": {"lr": config.muon_lr, "muon_lr": config.muon_lr,
                                           "adam_lr": config.learning_rate, "momentum": config.muon_momentum,
                                           "betas": betas, "weight_decay": config.weight_decay}}
    if config.offload_optimizer or config.offload_param:
        return {"type": "AdamW", "params": {"lr": config.learning_rate, "betas": betas,
                                            "weight_decay": config.weight_decay}}
    return None


def build_ds_config(config: TrainConfig, dtype: torch.dtype, world_size: int, hidden: int) -> dict:
    path = Path(config.ds_config) if config.ds_config else default_ds_config_path(config)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    zero = raw.get("zero_optimization", {})
    if config.zero_stage == 3 and config.offload_optimizer and not config.offload_param and not config.ds_config:
        zero.pop("offload_param", None)
    ds = fill_auto(raw, auto_values(config, dtype, world_size, hidden))
    section = optimizer_section(config)
    if section is not None and "optimizer" not in ds:
        ds["optimizer"] = section
    return ds
