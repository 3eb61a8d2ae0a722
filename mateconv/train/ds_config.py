"""DeepSpeed config: pick a file from ds_configs/ and fill its "auto" placeholders from the TrainConfig."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mateconv.config import ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def default_ds_config_path(config: TrainConfig) -> Path:
    parallel = config.parallel
    offload = parallel.offload_optimizer or parallel.offload_param
    if offload and parallel.zero_stage not in (2, 3):
        raise ConfigError("CPU offload configs exist for zero_stage 2 and 3")
    return DS_CONFIG_DIR / f"zero{parallel.zero_stage}{'_offload' if offload else ''}.json"


def auto_values(config: TrainConfig, dtype: torch.dtype, world_size: int, hidden: int) -> dict[str, object]:
    """Values for the "auto" keys, by dotted path."""
    return {
        "train_micro_batch_size_per_gpu": config.optim.batch_size,
        "gradient_accumulation_steps": config.optim.accumulation_steps,
        "train_batch_size": config.optim.batch_size * config.optim.accumulation_steps * world_size,
        "gradient_clipping": config.optim.grad_clip,
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
    """DeepSpeed builds the optimizer itself for Muon under ZeRO 1-3 (its ZeRO-aware MuonWithAuxAdam, for partitioned
    states) and for CPU offload (its CPUAdam); otherwise the engine passes its own torch optimizer (under ZeRO-0 our
    Muon, orthogonalising in fp32, whose step the engine can check for NaN and measure the grad norm of)."""
    optim = config.optim
    betas = [optim.adam_beta1, optim.adam_beta2]
    if optim.optimizer == "muon" and config.parallel.zero_stage >= 1:
        return {"type": "Muon", "params": {"lr": optim.muon_lr, "muon_lr": optim.muon_lr,
                                           "adam_lr": optim.learning_rate, "momentum": optim.muon_momentum,
                                           "betas": betas, "weight_decay": optim.weight_decay}}
    if config.parallel.offload_optimizer or config.parallel.offload_param:
        return {"type": "AdamW", "params": {"lr": optim.learning_rate, "betas": betas,
                                            "weight_decay": optim.weight_decay}}
    return None


def build_ds_config(config: TrainConfig, dtype: torch.dtype, world_size: int, hidden: int) -> dict:
    parallel = config.parallel
    path = Path(parallel.ds_config) if parallel.ds_config else default_ds_config_path(config)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    zero = raw.get("zero_optimization", {})
    if parallel.zero_stage == 3 and parallel.offload_optimizer and not (parallel.offload_param or parallel.ds_config):
        zero.pop("offload_param", None)
    ds = fill_auto(raw, auto_values(config, dtype, world_size, hidden))
    section = optimizer_section(config)
    if section is not None and "optimizer" not in ds:
        ds["optimizer"] = section
    return ds
