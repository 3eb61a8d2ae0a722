"""DeepSpeed config: pick a file from ds_configs/ (or the user's --ds_config) and fill it from the TrainConfig.

The run is the one the flags describe: its "auto" values are filled from them, and the keys that define what a step
is and how it is taken (batch sizes, accumulation, clipping, precision, ZeRO stage and offload) must agree with them
where the file fixes a value. The optimizer and learning-rate schedule are MateConv's own, from its flags, so a file
may not bring its own: DeepSpeed would run them while config.yaml and the logs recorded the flags."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mateconv.config import ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
MISSING = object()

# The flags MateConv builds these sections from, named when a file has its own.
OWN_SECTIONS = {
    "optimizer": "--optimizer, --learning_rate, --weight_decay, --adam_beta1, --adam_beta2 (--muon_lr, "
                 "--muon_momentum)",
    "scheduler": "--warmup_iters or --warmup_ratio, --min_lr_ratio, --max_steps or --epochs",
}


def default_ds_config_path(config: TrainConfig) -> Path:
    parallel = config.parallel
    offload = parallel.offload_optimizer or parallel.offload_param
    if offload and parallel.zero_stage not in (2, 3):
        raise ConfigError("CPU offload configs exist for zero_stage 2 and 3")
    return DS_CONFIG_DIR / f"zero{parallel.zero_stage}{'_offload' if offload else ''}.json"


def run_values(config: TrainConfig, dtype: torch.dtype, world_size: int) -> dict[str, tuple[object, str]]:
    """The keys that define the run, by dotted path: (MateConv's value, the flags it comes from, as shown)."""
    optim, stage = config.optim, config.parallel.zero_stage
    batch, accumulation = optim.batch_size, optim.accumulation_steps
    dtype_flag = f"--dtype {str(dtype).removeprefix('torch.')}"
    return {
        "train_micro_batch_size_per_gpu": (batch, f"--batch_size {batch}"),
        "gradient_accumulation_steps": (accumulation, f"--accumulation_steps {accumulation}"),
        "train_batch_size": (batch * accumulation * world_size,
                             f"--batch_size {batch} x --accumulation_steps {accumulation} x {world_size} rank(s)"),
        "gradient_clipping": (optim.grad_clip, f"--grad_clip {optim.grad_clip}"),
        "bf16.enabled": (dtype == torch.bfloat16, dtype_flag),
        "fp16.enabled": (dtype == torch.float16, dtype_flag),
        "zero_optimization.stage": (stage, f"--zero_stage {stage}"),
    }


def auto_values(config: TrainConfig, dtype: torch.dtype, world_size: int, hidden: int) -> dict[str, object]:
    """Values for the "auto" keys, by dotted path."""
    return {
        **{key: value for key, (value, _) in run_values(config, dtype, world_size).items()},
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


def lookup(node: dict, path: str):
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return MISSING
        node = node[key]
    return node


def set_value(node: dict, path: str, value) -> None:
    *sections, last = path.split(".")
    for key in sections:
        node = node.setdefault(key, {})
    node[last] = value


def check_against_flags(raw: dict, config: TrainConfig, values: dict[str, tuple[object, str]], path: Path) -> None:
    """A file's own optimizer or schedule, or a fixed value that disagrees with the flags, is an error naming both."""
    for section, flags in OWN_SECTIONS.items():
        if section in raw:
            raise ConfigError(f"--ds_config {path}: remove its \"{section}\" section: MateConv builds the {section} "
                              f"from {flags}")
    for key, (ours, flag) in values.items():
        theirs = lookup(raw, key)
        if theirs is not MISSING and theirs != "auto" and theirs != ours:
            raise ConfigError(f"--ds_config {path}: {key} is {json.dumps(theirs)} there but {flag} here: set it to "
                              f"\"auto\" (or {json.dumps(ours)}), or change the flag")
    zero = raw.get("zero_optimization", {})
    for part in ("offload_optimizer", "offload_param"):
        theirs = zero.get(part, {}).get("device", "none") != "none"
        if theirs != getattr(config.parallel, part):
            raise ConfigError(f"--ds_config {path}: zero_optimization.{part} {'is' if theirs else 'is not'} set "
                              f"there but --{part} is {str(not theirs).lower()} here: make them agree")


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
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a DeepSpeed config (a JSON object)")
    zero = raw.get("zero_optimization", {})
    if parallel.zero_stage == 3 and parallel.offload_optimizer and not (parallel.offload_param or parallel.ds_config):
        zero.pop("offload_param", None)
    values = run_values(config, dtype, world_size)
    check_against_flags(raw, config, values, path)
    ds = fill_auto(raw, auto_values(config, dtype, world_size, hidden))
    for key, (ours, _) in values.items():  # left out: DeepSpeed's default could differ from the flags
        if lookup(ds, key) is MISSING:
            set_value(ds, key, ours)
    section = optimizer_section(config)
    if section is not None:
        ds["optimizer"] = section
    return ds
