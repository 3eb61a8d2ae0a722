"""TrainConfig: every training setting of stages 4, 5, 9 and CPT, in sections, read from YAML files and flags.

    python 4.pretrain.py configs/pretrain_tiny.yaml --overrides learning_rate=2e-5 batch_size=32 --use_moe
    python 4.pretrain.py --preset mateconv-0.02b --max_steps 100

The `model` section is the model's own `MateConvConfig`; the other sections are declared here, each field once.
Every field has one flat name (`--dim`, `--learning_rate`, `--dpo_beta`); FLAGS maps flat names and the seeds'
aliases to (section, field). YAML files use flat names or sections (`model: {dim: 256}`), and `section.field` works
anywhere. `preset: NAME` sets the model size from `model.config.PRESETS`.

Later sources win: stage defaults < YAML files (in their order, wherever on the command line) < `--key value` flags and
`--overrides` (in command-line order); a YAML file's preset applies before its other keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import json
import math
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from mateconv.files import load_yaml_mapping, write_atomic, yaml_error
from mateconv.hub import cached_hub_config, hub_settings, is_hub_id, local_model_dir
from model.config import PRESETS, MateConvConfig
from model.config import ConfigError as ModelConfigError

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Names and paths whose "" means "not given" (W&B picks the run's name, the reference is the starting model): None or
# null there means that too, as seed 000's flags table writes it. Not init_from, where "" is "from scratch".
OPTIONAL_STRINGS = ("ds_config", "init_weights", "tensorboard_dir", "wandb_project", "wandb_entity", "wandb_run_name",
                    "wandb_watch", "ref_model_path")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors")  # init_weights: a file of weights, not a model directory


def dataset_path(value) -> str:
    """Seed 003's `datasets:` (a list with one entry, a path or {type, path}) -> data_path."""
    entries = value if isinstance(value, list) else [value]
    if len(entries) != 1:
        raise ConfigError(f"datasets: one data file per run here, got {len(entries)} (merge them into one file, "
                          "e.g. with 2.prepare_data.ipynb)")
    path = entries[0].get("path") if isinstance(entries[0], dict) else entries[0]
    if not isinstance(path, str) or not path:
        raise ConfigError(f"datasets: an entry needs the path of a local JSON/JSONL file, got {entries[0]!r}")
    return path


# The seeds' names for our flags (the flags tables and command lines of ../shared/seeds 000, 001, 003 and 004, and the
# keys of seed 003's train.py config), the one alias map. A name maps to one of our flat names; or to (flat name,
# {seed value: our value}) when the seed's flag picks a value of one of our settings (`--use_wandb` is `--tracker
# wandb`), an our-value of None setting nothing; or to (flat name, function of the seed's value). A flat name of None
# marks what MateConv always does (the flag is accepted with the seed's value only). A seed key set to null (YAML)
# sets nothing. docs/training.md explains each.
SEED_ALIASES: dict[str, str | tuple[str | None, dict | Callable]] = {
    "lr": "learning_rate", "save_interval": "save_interval_steps", "ds_config_path": "ds_config",
    "loss_type": "dpo_loss_type", "label_smoothing": "dpo_label_smoothing", "kl_coef": "dpo_kl_coef",
    "sft_coef": "dpo_sft_coef", "beta": "dpo_beta", "pairs_path": "data_path", "wandb_name": "wandb_run_name",
    "wandb_log_freq": "tracker_interval", "wandb_watch_log_freq": "wandb_watch_freq",
    "use_wandb": ("tracker", {True: "wandb", False: "none"}),
    "ddp": ("engine", {True: "torch", False: "auto"}),
    "trainer": ("engine", {"BasicTrainer": "auto", "FSDPTrainer": "fsdp"}),  # seed 003's `--overrides trainer=...`
    "wandb_watch_model": ("wandb_watch", {True: "gradients", False: ""}),
    "wandb_watch_log": ("wandb_watch", {"gradients": "gradients", "parameters": "parameters", "all": "all",
                                        "None": ""}),
    "save_best_only": (None, {True: None}),  # best/ (lowest val_loss) is always written
    "save_last": (None, {True: None}),  # final/ is always written
    # seed 003's config keys (`model.*`, `loss.*` and `wandb.*` are its sections); its loss.name also names the stage
    "exp_name": "wandb_run_name", "n_epochs": "epochs", "max_length": "max_seq_len",
    "gradient_accumulation_steps": "accumulation_steps", "activation_checkpointing": "gradient_checkpointing",
    "eval_every_steps": "eval_interval", "n_eval_examples": "eval_examples", "do_first_eval": "eval_at_start",
    "model.name_or_path": "init_from", "model.archive": "init_weights", "model.policy_dtype": "dtype",
    "loss.beta": "dpo_beta", "wandb.project": "wandb_project", "wandb.entity": "wandb_entity",
    "wandb.enabled": ("tracker", {True: "wandb", False: "none"}),
    "report_to_tensorboard": ("tracker", {True: "tensorboard", False: None}),
    "debug": ("tracker", {True: "none", False: None}),  # seed 003's debug mode: no W&B (checkpoints still written)
    "loss.name": ("dpo_loss_type", {"sft": None, "dpo": "sigmoid", "ipo": "ipo"}),
    "datasets": ("data_path", dataset_path),
}
# `--mode` (seed 000's one-program trainer) names the stage; each stage is its own program here.
STAGE_PROGRAMS = {"pretrain": "4.pretrain.py", "sft": "5.full_sft.py", "dpo": "9.train_dpo.py"}
# The keys that name the stage of a one-program trainer, {value: stage}: seed 000's `--mode`, seed 003's `loss.name`.
STAGE_KEYS = {"mode": {stage: stage for stage in STAGE_PROGRAMS},
              "loss.name": {"sft": "sft", "dpo": "dpo", "ipo": "dpo"}}
# Every default path lives under this root; `--out_dir` naming a root moves them all (`is_layout_root`).
LAYOUT_ROOT = "out"
LAYOUT_DIRS = ("tokenizer", "tokens", "data", *STAGE_PROGRAMS)


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key."""


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        named = ", ".join(str(option) if option != "" else '""' for option in allowed)
        raise ConfigError(f"{name}: {value!r} is not one of {named}")


def check_positive(section, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(section, name)}")


def check_non_negative(section, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(section, name)}")


@dataclass
class DataConfig:
    data_path: str = "out/tokens/pretrain/train"
    val_data_path: str = "out/tokens/pretrain/val"
    tokenizer_path: str = "out/tokenizer"
    num_workers: int = 2
    packing: bool = False  # SFT: several whole conversations per row (pretraining rows are always packed)
    # > 0: hold out this share of a raw data_path file's records for validation (LLaMA-Factory's val_size)
    val_size: float = 0.0

    def __post_init__(self) -> None:
        check_non_negative(self, ("num_workers",))
        if not 0 <= self.val_size < 1:
            raise ConfigError(f"val_size is the share of the records held out, in [0, 1): got {self.val_size}")


@dataclass
class OptimConfig:
    """The optimisation run: batches, length, optimizer and learning-rate schedule."""
    batch_size: int = 32  # per rank and micro-batch
    accumulation_steps: int = 1
    total_batch_size: int = 0  # > 0: examples per optimizer step over all ranks; sets batch_size (`per_rank_sizes`)
    epochs: int = 1
    max_steps: int = 0
    seed: int = 42
    optimizer: str = "adamw"
    learning_rate: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_iters: int = 0
    warmup_ratio: float = 0.0  # > 0: warm up for this fraction of the run instead of warmup_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 10  # stop (with a checkpoint) after this many steps in a row with a NaN/inf loss or gradient

    def __post_init__(self) -> None:
        self.optimizer = self.optimizer.lower()  # seed 003 writes AdamW
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        check_positive(self, ("batch_size", "accumulation_steps", "epochs", "learning_rate", "max_nonfinite_steps"))
        check_non_negative(self, ("max_steps", "warmup_iters", "grad_clip", "total_batch_size", "weight_decay",
                                  "muon_lr"))
        if not 0 <= self.seed < 2**31:  # numpy takes [0, 2**32); each rank seeds with seed + its rank
            raise ConfigError(f"seed must be in [0, 2**31), got {self.seed}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("adam_beta1", "adam_beta2", "muon_momentum"):  # torch refuses them only as the optimizer is built
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ParallelConfig:
    """Engine, devices, precision and memory savers."""
    engine: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    zero_stage: int = 0
    ds_config: str = ""
    offload_optimizer: bool = False
    offload_param: bool = False
    gradient_checkpointing: bool = False
    compile: bool | None = None  # torch.compile the model; None: on CUDA yes (zero_stage 0-2), on CPU no
    local_rank: int = -1

    def __post_init__(self) -> None:
        check_choice("engine", self.engine, ("auto", "deepspeed", "torch", "fsdp"))
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage < 1:
            raise ConfigError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.engine in ("fsdp", "torch") and (self.zero_stage or self.ds_config or self.offload_optimizer
                                                 or self.offload_param):
            engine = ("engine fsdp shards parameters, gradients and optimizer state itself" if self.engine == "fsdp"
                      else "engine torch is plain PyTorch (one process or DDP)")
            raise ConfigError(f"{engine}: zero_stage, ds_config and offload are DeepSpeed's settings (use --engine "
                              "deepspeed for them)")
        if self.compile and self.zero_stage == 3:
            raise ConfigError("compile with zero_stage 3 is not supported (ZeRO-3 gathers parameters in hooks the "
                              "compiled graph would skip); use zero_stage 0-2 or --compile 0")

    def compiles(self, device) -> bool:
        """Whether the engine compiles the model on `device` (`compile` None: on CUDA with zero_stage 0-2)."""
        return self.compile if self.compile is not None else device.type == "cuda" and self.zero_stage < 3


@dataclass
class CheckpointConfig:
    """Where a run starts from and where it writes."""
    out_dir: str = "out/pretrain"
    init_from: str = ""  # a saved Hugging Face causal LM to start from; the model section is then ignored
    # a file of weights loaded into the starting model (init_from's, else the model section's): a state dict, or a dict
    # holding it under "state" (seed 003's model.archive, e.g. policy.pt); a directory here is taken as init_from
    init_weights: str = ""
    trust_remote_code: bool = False  # run the modelling code an init_from/ref_model_path directory ships (auto_map)
    # "auto": the newest intact checkpoint of out_dir if any, "never": start over, else a checkpoint's path; true
    # (also yes, 1, a bare --resume) is auto, false is never
    resume: bool | str = "auto"
    save_interval_steps: int = 1000
    save_every_epoch: bool = False  # also a checkpoint at the end of each epoch (seed 002's CPTTrainer saves so)
    keep_checkpoint_max: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):
            self.resume = "auto" if self.resume else "never"
        self.resume = self.resume or "auto"  # "" is the default, not the current directory
        check_positive(self, ("save_interval_steps", "keep_checkpoint_max"))
        if self.init_weights and not self.init_weights.lower().endswith(WEIGHT_FILES):
            self.init_from, self.init_weights = self.init_weights, ""  # a saved model's directory (a run's final/)


@dataclass
class TrackConfig:
    """Evaluation and logging: when, how much, and where to."""
    log_interval: int = 10
    # metrics.jsonl, W&B and TensorBoard rows every N steps (seed 000's wandb_log_freq); 0 = every log_interval
    tracker_interval: int = 0
    eval_interval: int = 500
    eval_batches: int = 50  # an evaluation's examples in batches of batch_size, over all ranks; 0 = all (eval_rows)
    eval_examples: int = 0  # > 0: evaluate on this many held-out examples instead (eval_rows)
    eval_at_start: bool | None = None  # evaluate the starting model as step 0; None: DPO yes, the others no
    peak_flops: float = 0.0
    tracker: str = "wandb"
    tensorboard_dir: str = ""  # set: TensorBoard events go here whatever the tracker; "" = <out_dir>/tensorboard
    wandb_project: str = ""  # "" = $WANDB_PROJECT (the seeds export it), else "mateconv"
    wandb_entity: str = ""  # "" = $WANDB_ENTITY, else your W&B default
    wandb_run_name: str = ""
    wandb_watch: str = ""
    wandb_watch_freq: int = 100  # in backward passes (micro-batches)
    # "end": the final model as a W&B artifact, "checkpoint": also each checkpoint's, "" (or false): none; a bare
    # --wandb_log_model (or true) is "end", as the switch it was
    wandb_log_model: bool | str = ""
    wandb_log_code: bool = False

    @property
    def tracker_every(self) -> int:
        """The steps between tracker rows: tracker_interval, else log_interval."""
        return self.tracker_interval or self.log_interval

    def eval_rows(self, batch_size: int) -> int | None:
        """How many validation examples (the first ones) an evaluation covers, the same on any number of ranks, which
        split them: `eval_examples`, else `eval_batches` x `batch_size`; None: all."""
        return self.eval_examples or self.eval_batches * batch_size or None

    def __post_init__(self) -> None:
        check_choice("tracker", self.tracker, ("wandb", "tensorboard", "none"))
        check_choice("wandb_watch", self.wandb_watch, ("", "gradients", "parameters", "all"))
        if isinstance(self.wandb_log_model, bool):
            self.wandb_log_model = "end" if self.wandb_log_model else ""
        check_choice("wandb_log_model", self.wandb_log_model, ("", "end", "checkpoint"))
        check_positive(self, ("log_interval", "eval_interval", "wandb_watch_freq"))
        check_non_negative(self, ("eval_batches", "eval_examples", "tracker_interval", "peak_flops"))


@dataclass
class LoRAConfig:
    PREFIX: ClassVar[str] = "lora_"
    enabled: bool = field(default=False, metadata={"flag": "use_lora"})
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:  # peft refuses these only as it wraps the model, in a traceback
        for name in ("r", "alpha"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{self.PREFIX}{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.PREFIX}dropout must be in [0, 1), got {self.dropout}")


@dataclass
class DPOConfig:
    """Stage 9 (docs/dpo.md): the preference loss and its extra terms, the reference, the forgetting evaluation."""
    PREFIX: ClassVar[str] = "dpo_"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    kl_coef: float = 0.0
    sft_coef: float = 0.0
    ref_model_path: str = field(default="", metadata={"flag": "ref_model_path"})  # "" = init_from
    precompute_ref: bool = field(default=False, metadata={"flag": "precompute_ref"})
    forget_data_paths: list[str] = field(default_factory=lambda: ["out/tokens/pretrain/val", "out/tokens/sft/val"],
                                         metadata={"flag": "forget_data_paths"})

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"dpo_loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"dpo_beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo_label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError("dpo_label_smoothing (conservative DPO) applies to dpo_loss_type sigmoid only")
        if self.kl_coef < 0 or self.sft_coef < 0:
            raise ConfigError(f"dpo_kl_coef and dpo_sft_coef must be >= 0, got {self.kl_coef}, {self.sft_coef}")


@dataclass
class TrainConfig:
    model: MateConvConfig = field(default_factory=MateConvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self) -> None:
        if self.track.wandb_watch and self.parallel.zero_stage == 3:
            raise ConfigError("wandb_watch is not supported with zero_stage 3 (parameters are partitioned, so the "
                              "hooks would see empty tensors); use zero_stage 0-2 or drop wandb_watch")
        if self.parallel.engine == "fsdp":
            sharded_out = {"wandb_watch": bool(self.track.wandb_watch), "LoRA": self.lora.enabled,
                           "optimizer muon": self.optim.optimizer == "muon"}
            for name, used in sharded_out.items():
                if used:
                    raise ConfigError(f"{name} is not supported with engine fsdp (each rank holds row shards of the "
                                      f"weights); use --engine torch or deepspeed")

    def get(self, key: str):
        """The value of a flat key (`use_moe`, `dpo_beta`, `lr`, `model.dim`)."""
        section, name = resolve(key)
        return getattr(getattr(self, section), name)


def declared_fields(cls) -> list[tuple[dataclasses.Field, object]]:
    """(field, type) for each field `cls` declares itself (MateConvConfig also inherits PretrainedConfig's).

    The annotations are strings (postponed evaluation), and typing.get_type_hints fails on PretrainedConfig's, so
    each is evaluated in its own module."""
    namespace = vars(sys.modules[cls.__module__])
    declared = vars(cls).get("__annotations__", {})
    return [(f, eval(f.type, namespace) if isinstance(f.type, str) else f.type)
            for f in dataclasses.fields(cls) if f.name in declared]


SECTIONS: dict[str, type] = {f.name: kind for f, kind in declared_fields(TrainConfig)}
FIELDS: dict[tuple[str, str], tuple[dataclasses.Field, object]] = {  # (section, field name) -> (field, type)
    (section, f.name): (f, kind) for section, cls in SECTIONS.items() for f, kind in declared_fields(cls)}
KINDS = {place: kind for place, (_, kind) in FIELDS.items()}
NAMES = {(section, name): f.metadata.get("flag", getattr(SECTIONS[section], "PREFIX", "") + name)
         for (section, name), (f, _) in FIELDS.items()}  # the flat names
# What `auto` picks, for the fields whose default leaves the value to the run (`--help` shows it): "auto", or None,
# which such a field also takes as `auto`.
AUTO = {("model", "hidden_dim"): "2/3 of 4 x dim, rounded up to a multiple of multiple_of",
        ("model", "moe_impl"): "grouped GEMMs where torch._grouped_mm takes the dtype, else a loop",
        ("parallel", "engine"): "deepspeed under a launcher or with zero_stage/ds_config/offload_optimizer, else torch",
        ("parallel", "device"): "a GPU when there is one, else cpu",
        ("parallel", "dtype"): "bfloat16 on GPUs that have it, float16 on older ones, float32 on CPUs",
        ("parallel", "compile"): "on with CUDA and zero_stage 0-2, else off",
        ("track", "eval_at_start"): "on for DPO, off for the other stages",
        ("checkpoint", "resume"): "the newest intact checkpoint in out_dir, if any"}
# The one alias map: every flat name and seed alias -> (section, field).
FLAGS: dict[str, tuple[str, str]] = {name: place for place, name in NAMES.items()}
ALIAS_TARGETS = {alias: target if isinstance(target, str) else target[0] for alias, target in SEED_ALIASES.items()}
FLAGS.update({alias: FLAGS[target] for alias, target in ALIAS_TARGETS.items() if target is not None})


# Hugging Face Trainer / TRL argument names a user of those may type, with ours: an unknown key among them is answered
# with our name (a hint, not an alias: the seeds' names above are the ones that run as they are).
TRAINER_ARGUMENTS = {
    "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "max_grad_norm": "grad_clip", "logging_steps": "log_interval",
    "save_steps": "save_interval_steps", "eval_steps": "eval_interval", "save_total_limit": "keep_checkpoint_max",
    "warmup_steps": "warmup_iters", "output_dir": "out_dir", "report_to": "tracker", "resume_from_checkpoint": "resume",
    "model_name_or_path": "init_from", "bf16": "dtype", "fp16": "dtype",
    "run_name": "wandb_run_name", "dataloader_num_workers": "num_workers",
}


# Adam's betas as torch (`betas`) and nanoGPT (`beta1`, `beta2`) name them: a hint too (seed 000's `beta` is dpo_beta).
ADAM_BETAS = ("beta1", "beta2", "betas", "adam_betas")


def homes_elsewhere(section: str, name: str) -> list[tuple[str, str]]:
    """The (section, field) places of `name`, a field's or a flat name, in sections other than `section`."""
    places = [place for place in KINDS if place[1] == name] + ([FLAGS[name]] if name in FLAGS else [])
    return [place for place in dict.fromkeys(places) if place[0] != section]


def _unknown(key: str) -> ConfigError:
    if key in TRAINER_ARGUMENTS:
        return ConfigError(f"unknown config key '{key}' (a Hugging Face Trainer argument); here it is "
                           f"'{TRAINER_ARGUMENTS[key]}'")
    section, _, name = key.rpartition(".")
    if name in ADAM_BETAS:
        return ConfigError(f"unknown config key '{key}'; Adam's betas here are 'adam_beta1' and 'adam_beta2'")
    homes = homes_elsewhere(section, name) if section in SECTIONS else []
    if homes:
        listed = " or ".join(f"section {home} ({home}.{field_name})" for home, field_name in homes)
        return ConfigError(f"unknown config key '{key}'; {name} belongs in {listed}")
    dotted = [f"{section}.{name}" for section, name in KINDS]
    close = difflib.get_close_matches(key, list(FLAGS) + dotted, n=1)
    hint = f"; did you mean '{NAMES[FLAGS[close[0]]] if close[0] in FLAGS else close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def seed_value(key: str, value) -> tuple[str | None, object]:
    """(our flat name, value) for a seed flag that maps values (`use_wandb`, True) -> ("tracker", "wandb"); a flat
    name or value of None: nothing to set."""
    target, values = SEED_ALIASES[key]
    if callable(values):
        return target, values(value)
    switch = all(isinstance(v, bool) for v in values)
    if switch and isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
        value = value.lower() in TRUE_WORDS
    if value not in values:
        if target is None:
            raise ConfigError(f"{key}: MateConv always does this (docs/training.md); only {next(iter(values))} "
                              f"is accepted, got {value!r}")
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, values))}")
    return target, values[value]


def resolve(key: str) -> tuple[str, str]:
    """(section, field) of a flat name, seed alias or `section.field`, or ConfigError naming the closest key."""
    key = key.replace("-", "_")
    section, dot, name = key.partition(".")
    if dot and (section, name) in KINDS:
        return section, name
    if key not in FLAGS:
        raise _unknown(key)
    return FLAGS[key]


def convert(place: tuple[str, str], value):
    """`value` (a YAML value or a command-line string) as the type of field `place`, or ConfigError."""
    key, kind = NAMES[place], KINDS[place]
    optional = isinstance(kind, types.UnionType) and type(None) in kind.__args__
    if optional:
        kind = next(k for k in kind.__args__ if k is not type(None))
        unset = ("none", "null", "", "auto") if place in AUTO else ("none", "null", "")
        if value is None or (isinstance(value, str) and value.lower() in unset):
            return None
    if kind == bool | str:  # a switch that may name a mode instead (wandb_log_model)
        switch = isinstance(value, bool) or str(value).lower() in TRUE_WORDS + FALSE_WORDS
        kind = bool if switch else str
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
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None:
                if not math.isfinite(number):
                    raise ConfigError(f"{key}: expected a finite number, got {value!r}")
                return number
    elif kind is str:
        if key in OPTIONAL_STRINGS and str(value).lower() in ("none", "null"):
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(kind) is list:
        expected = "list of strings"
        if isinstance(value, str):
            if value.startswith("[") and value.endswith("]"):  # a YAML list: `--overrides key=[a, b]`
                value = value[1:-1]
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def load_yaml(path: str | Path) -> list[tuple[str, object]]:
    """A config file's (key, value) pairs, sections flattened to `section.field`, its preset first. A key that is not
    a config key, or a value its key does not take, is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = load_yaml_mapping(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error(path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    pairs = []
    for key, value in data.items():
        if isinstance(value, dict):  # a section of ours, or one of seed 003's
            pairs += [(f"{key}.{name}", inner) for name, inner in value.items()]
        else:
            pairs.append((str(key), value))
    # each setting: the key that set it; a preset's may be overridden, and seed 003's switches combine (wandb.enabled
    # and report_to_tensorboard both pick the tracker)
    setters: dict[tuple[str, str], str] = {}
    for key, value in pairs:
        try:
            if key in STAGE_KEYS:  # `mode` and `loss.name` name the stage (parse_config)
                continue
            for section, name, _ in placed([(key, value)]):
                if key == "preset" or isinstance(SEED_ALIASES.get(key), tuple):
                    continue
                if setters.setdefault((section, name), key) != key:
                    first = setters[section, name]
                    raise ConfigError(f"{key} sets {NAMES[section, name]} again (first as {first} at line "
                                      f"{key_lines(text).get(first)})")
        except ConfigError as e:
            line = key_lines(text).get(key)  # none for a key YAML reads as another type (`true:`)
            raise ConfigError(f"{path}:{line}: {e}" if line else f"{path}: {e}") from None
    return sorted(pairs, key=lambda pair: pair[0] != "preset")


def key_lines(text: str) -> dict[str, int]:
    """The line of each key of a YAML mapping, a section's keys as `section.field`."""
    lines = {}
    for key, value in yaml.compose(text, Loader=yaml.SafeLoader).value:
        lines[key.value] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            lines.update({f"{key.value}.{inner.value}": inner.start_mark.line + 1 for inner, _ in value.value})
    return lines


def flag_kind(name: str):
    """The type a command-line flag's value parses as."""
    name = name.replace("-", "_")
    if name in ("preset", "mode"):
        return str
    if isinstance(SEED_ALIASES.get(name), tuple):
        values = SEED_ALIASES[name][1]
        return bool if not callable(values) and all(isinstance(v, bool) for v in values) else str
    return KINDS[resolve(name)]


def is_config_file(token: str) -> bool:
    """Whether a command-line token names a YAML file: it also ends the values of the flag or --overrides before it."""
    return token.endswith((".yaml", ".yml")) and not token.startswith("--") and "=" not in token


def parse_args(argv: list[str]) -> list[tuple[str, object]]:
    """Command-line tokens -> ordered (key, raw value) pairs: the YAML files' keys (files in their order), then the
    flags' and overrides' (in theirs), wherever on the line a file is named."""
    files: list[tuple[str, object]] = []
    flags: list[tuple[str, object]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            if not is_config_file(token):
                raise ConfigError(f"unexpected argument '{token}' (a config file must end in .yaml)")
            files += load_yaml(token)
            i += 1
            continue
        name, has_value, inline = token[2:].partition("=")
        if name == "config":
            path = inline if has_value else (argv[i + 1] if i + 1 < len(argv) else "")
            if not path or path.startswith("--"):
                raise ConfigError("--config needs a value")
            files += load_yaml(path)
            i += 1 if has_value else 2
            continue
        if name == "overrides":
            i += 1
            while i < len(argv) and not argv[i].startswith("--") and not is_config_file(argv[i]):
                key, eq, value = argv[i].partition("=")
                if not eq:
                    raise ConfigError(f"override '{argv[i]}' must look like key=value")
                flags.append((key, value))
                i += 1
            continue
        kind = flag_kind(name)
        values = list(itertools.takewhile(lambda token: not token.startswith("--") and not is_config_file(token),
                                          argv[i + 1:]))
        if has_value:
            flags.append((name, inline))
            i += 1
        elif len(values) > 1 and typing.get_origin(kind) is list:  # --lora_target_modules q_proj v_proj
            flags.append((name, values))
            i += 1 + len(values)
        elif values:
            flags.append((name, values[0]))
            i += 2
        elif kind is bool or kind == bool | None or kind == bool | str:
            flags.append((name, True))  # a bare boolean flag: --use_moe, --eval_at_start
            i += 1
        else:
            raise ConfigError(f"--{name} needs a value")
    return files + flags


def preset_pairs(name) -> list[tuple[str, object]]:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown model size {name!r}; choose one of {', '.join(PRESETS)}")
    return [(f"model.{key}", value) for key, value in PRESETS[name].items()]


# Two ways to give one size, per rank or over all ranks (batch_size, total_batch_size), in batches or in examples
# (eval_batches, eval_examples): the one given last wins (`--overrides batch_size=32` after a config's
# total_batch_size). A total (the second) of 0 is not given, so it leaves the other: a saved config.yaml writes
# `total_batch_size: 0` after `batch_size: 4`.
SIZE_PAIRS = {("optim", "batch_size"): ("optim", "total_batch_size"),
              ("track", "eval_batches"): ("track", "eval_examples")}
TOTALS = {total: size for size, total in SIZE_PAIRS.items()}


def placed(pairs: Iterable[tuple[str, object]]) -> Iterator[tuple[str, str, object]]:
    """(section, field, value) of each (key, value) pair in order: keys flat, aliases or `section.field`, a `preset`
    expanded into the model size, values converted."""
    for key, value in pairs:
        key = key.replace("-", "_")
        if key in SEED_ALIASES and value is None:
            continue
        if isinstance(SEED_ALIASES.get(key), tuple):
            key, value = seed_value(key, value)
            if key is None or value is None:
                continue
        for inner_key, inner_value in preset_pairs(value) if key == "preset" else [(key, value)]:
            section, name = resolve(inner_key)
            yield section, name, convert((section, name), inner_value)


def check_key(key: str, value) -> None:
    """ConfigError unless `key` (flat, a seed alias, `section.field` or `preset`) is a config key that takes `value`."""
    list(placed([(key, value)]))


def build_config(pairs: Iterable[tuple[str, object]]) -> TrainConfig:
    """A TrainConfig from (key, value) pairs in order (later ones win); see `placed`."""
    values: dict[str, dict] = {section: {} for section in SECTIONS}
    for section, name, value in placed(pairs):
        values[section][name] = value
        if (section, name) in SIZE_PAIRS:
            values[section].pop(SIZE_PAIRS[section, name][1], None)
        elif (section, name) in TOTALS and value:
            values[section].pop(TOTALS[section, name][1], None)
    try:
        model = MateConvConfig(**values.pop("model"))
    except ModelConfigError as e:
        raise ConfigError(str(e)) from None
    return TrainConfig(model, **{section: SECTIONS[section](**fields) for section, fields in values.items()})


def is_layout_root(path: str | Path) -> bool:
    """Whether `--out_dir path` names the root of the layout the seeds' way (`--out_dir out`: every stage writes into
    `out/`) rather than one stage's directory: its name is `out`, or it holds tokenizer/, tokens/, data/ or a stage's
    directory; never when it holds a run itself (checkpoints/ or final/)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() or (path / "final").is_dir():
        return False
    return path.name == LAYOUT_ROOT or any((path / name).is_dir() for name in LAYOUT_DIRS)


def under_root(value, root: str | Path):
    """A default path under `out/` (or a list of them) moved to `root`; anything else as it is."""
    if isinstance(value, list):
        return [under_root(v, root) for v in value]
    if isinstance(value, str) and Path(value).parts[:1] == (LAYOUT_ROOT,):
        return str(Path(root, *Path(value).parts[1:]))
    return value


def rooted_defaults(defaults: dict, root: str | Path) -> list[tuple[str, object]]:
    """The stage defaults and the field defaults that are paths under `out/`, moved to `root`: with `--out_dir R` a
    stage writes `R/<stage>` and reads `R/tokens/...`, `R/tokenizer` and the previous stage's `R/<stage>/final`."""
    moved = {}
    for (section, name), (f, _) in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if under_root(default, root) != default:
            moved[NAMES[section, name]] = under_root(default, root)
    moved.update({NAMES[resolve(key)]: under_root(value, root) for key, value in defaults.items()})
    return list(moved.items())


def parse_config(argv: list[str], defaults: dict | None = None, stage: str = "") -> TrainConfig:
    """A TrainConfig from stage defaults and command-line tokens (YAML paths, flags, --overrides). `stage` is the
    program's stage: a `--mode` naming another stage is an error. An `out_dir` that is a layout root
    (`is_layout_root`) becomes `<root>/<stage>`, and the stage reads the other stages' outputs under that root."""
    defaults = defaults or {}
    pairs = parse_args(argv)
    # the last key naming a stage names it, as any key given twice (`--overrides loss.name=dpo` after a config's sft)
    named = [(key, value) for key, value in pairs if key in STAGE_KEYS and isinstance(value, str)]
    if named:
        key, value = named[-1]
        if (other := STAGE_KEYS[key].get(value, value)) != stage:
            program = f"; {STAGE_PROGRAMS[other]} trains {other}" if other in STAGE_PROGRAMS else ""
            raise ConfigError(f"{key}: {value!r} is not this program's stage ({stage or 'none'}){program}")
    pairs = [(key, value) for key, value in pairs if key != "mode"]
    config = build_config([*defaults.items(), *pairs])
    root = config.checkpoint.out_dir
    if is_layout_root(root):
        pairs = [(key, value) for key, value in pairs if key == "preset" or isinstance(SEED_ALIASES.get(key), tuple)
                 or resolve(key) != ("checkpoint", "out_dir")]
        config = build_config([*rooted_defaults(defaults, root), *pairs])
    fit_init_from(config, pairs)
    check_tokenizer_path(config, pairs)
    if config.parallel.local_rank < 0 and "LOCAL_RANK" in os.environ:
        config.parallel.local_rank = int(os.environ["LOCAL_RANK"])
    return config


# The model flags a run from a saved model (init_from) still uses; the others are the saved model's own.
USED_WITH_INIT_FROM = ("max_seq_len", "flash_attn")
# The model settings that only training reads (no parameter depends on them): a run from a saved MateConv model may
# change them (models.build_model sets them on it), and a resume may too, with a note.
TRAINING_ONLY_MODEL = ("dropout", "aux_loss_alpha", "seq_aux")


def is_mateconv(settings: dict) -> bool:
    """Whether saved model settings (saved_model_settings) are a MateConv model's; a training checkpoint's model
    section names no model_type."""
    return settings.get("model_type", MateConvConfig.model_type) == MateConvConfig.model_type


def hf_dropouts(saved: dict) -> list[str]:
    """The dropout probabilities in a Hugging Face model's settings, which `dropout` sets: Llama's and Qwen2's
    attention_dropout, GPT-NeoX's attention_dropout and hidden_dropout, GPT-2's *_pdrop (not a classification
    head's)."""
    return [name for name, value in saved.items() if name.endswith(("dropout", "pdrop"))
            and not name.startswith(("classifier", "summary")) and type(value) in (int, float)]


def hf_dropout_settings(saved: dict, dropout: float) -> dict[str, float]:
    """The settings that give a Hugging Face model (`saved`, its config.json) the run's `dropout`: each of its dropout
    probabilities, unless `dropout` is what it has (its largest: fit_init_from's value when not given)."""
    names = hf_dropouts(saved)
    return {name: dropout for name in names} if names and dropout != max(saved[name] for name in names) else {}


def used_with(init_from: str | Path) -> tuple[str, ...]:
    """The model flags a run from saved model `init_from` uses: USED_WITH_INIT_FROM, and for a MateConv model the
    TRAINING_ONLY_MODEL settings, for a Hugging Face model with dropout settings `dropout`."""
    saved = saved_model_settings(Path(init_from)) or {}
    if saved and is_mateconv(saved):
        return USED_WITH_INIT_FROM + TRAINING_ONLY_MODEL
    return USED_WITH_INIT_FROM + (("dropout",) if hf_dropouts(saved) else ())


def is_training_checkpoint(path: str | Path) -> bool:
    """A run's `checkpoints/step_N` (trainer state, weights, the run's config.yaml), not a save_pretrained model."""
    return (Path(path) / "trainer_state.json").is_file() and not (Path(path) / "config.json").is_file()


def saved_model_settings(path: Path) -> dict | None:
    """The model settings of a saved model (its config.json; a hub model's in the local Hugging Face cache) or of a
    training checkpoint (the model section of its config.yaml: init_from may name one,
    mateconv.train.models.model_dir); None when there are none to read (the model loader names a broken file)."""
    try:
        if (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text())
        if is_training_checkpoint(path) and (path / "config.yaml").is_file():
            return (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model")
        if is_hub_id(path) and (cached := cached_hub_config(str(path))):
            return json.loads(Path(cached).read_text())
    except (ValueError, yaml.YAMLError):
        pass
    return None


def fit_init_from(config: TrainConfig, given: list[tuple[str, object]]) -> None:
    """The model section of a run from a saved MateConv model (init_from), against the settings `given` on the
    command line or in a YAML file. A model flag with another value than the saved model has is an error: the saved
    model is trained as it is (seed 001's `--mode sft --dim 512 --n_layers 8` must match its pretrained model), and a
    flag that silently did nothing would mislead. max_seq_len not given is at most the saved model's (a Hugging Face
    model's max_position_embeddings or n_positions; the stage's default 512 cuts rows for a model that takes fewer
    tokens). A MateConv model's TRAINING_ONLY_MODEL settings may be
    given (SFT with dropout after pretraining without); not given, they are the saved model's. For a Hugging Face
    model `dropout` sets its dropout probabilities (hf_dropouts); not given, it is the largest of them."""
    if not config.checkpoint.init_from:
        return
    init_from = Path(config.checkpoint.init_from)
    # a hub model's config.json is fetched now (its weights at load), so that its dropout is set as a local one's
    saved = hub_settings(str(init_from)) if is_hub_id(init_from) else saved_model_settings(init_from)
    if not saved:
        return
    named = {name: value for section, name, value in placed(given) if section == "model"}
    length = saved.get("max_seq_len" if is_mateconv(saved) else "max_position_embeddings") or saved.get("n_positions")
    if "max_seq_len" not in named and isinstance(length, int):
        config.model.max_seq_len = min(config.model.max_seq_len, length)
    used = used_with(init_from)
    for name in used:
        if name in TRAINING_ONLY_MODEL and name not in named and name in saved:
            setattr(config.model, name, saved[name])
    if not is_mateconv(saved):
        dropouts = hf_dropouts(saved)
        if "dropout" in named and not dropouts:
            raise ConfigError(f"dropout: init_from {init_from} ({saved.get('model_type', 'its model')}) has no dropout "
                              "setting in its config.json to set; drop --dropout")
        if "dropout" not in named and dropouts:
            config.model.dropout = max(saved[name] for name in dropouts)
    clashes = {name: value for name, value in named.items()
               if name not in used and name in saved and saved[name] != value}
    if clashes:
        listed = ", ".join(f"{name} {value} (it has {saved[name]})" for name, value in clashes.items())
        raise ConfigError(f"init_from {init_from} is the model this run trains, as it is: {listed}; drop those model "
                          "flags, or start from a model of that shape")


def check_tokenizer_path(config: TrainConfig, given: list[tuple[str, object]]) -> None:
    """A run from a model with its own tokenizer (init_from) trains with that one, whose ids the embeddings learned:
    a tokenizer_path `given` that names another tokenizer is refused in one line (it was ignored without a word)."""
    init_from, path = config.checkpoint.init_from, config.data.tokenizer_path
    own, named = local_model_dir(init_from) / "tokenizer.json", Path(path) / "tokenizer.json"
    if not (init_from and own.is_file() and named.is_file()
            and ("data", "tokenizer_path") in [(section, name) for section, name, _ in placed(given)]):
        return
    from tokenizers import Tokenizer

    from mateconv.data.shards import tokenizer_model

    theirs, ours = Tokenizer.from_file(str(named)), Tokenizer.from_file(str(own))
    if tokenizer_model(theirs.to_str()) == tokenizer_model(ours.to_str()):
        return
    sizes = theirs.get_vocab_size(), ours.get_vocab_size()
    differs = (f"{sizes[0]} tokens, the model's {sizes[1]}" if sizes[0] != sizes[1] else
               "as many tokens as the model's, but other tokens or merges")
    raise ConfigError(f"tokenizer_path: {path} is not the tokenizer of init_from {init_from} ({differs}); a run from a "
                      "model trains with the model's own tokenizer: drop --tokenizer_path, or start from a model "
                      f"trained with {path}")


def per_rank_sizes(config: TrainConfig, world_size: int) -> None:
    """Sets batch_size from total_batch_size (examples per step over all ranks) for a run on `world_size` ranks."""
    optim = config.optim
    if optim.total_batch_size:
        if optim.total_batch_size % (optim.accumulation_steps * world_size):
            raise ConfigError(f"total_batch_size {optim.total_batch_size} is not a multiple of accumulation_steps "
                              f"{optim.accumulation_steps} x {world_size} rank(s)")
        optim.batch_size = optim.total_batch_size // (optim.accumulation_steps * world_size)


def config_to_dict(config: TrainConfig) -> dict:
    """{section: {field: value}}, the fields each section declares (the model's without PretrainedConfig's)."""
    return {section: {name: getattr(getattr(config, section), name) for s, name in KINDS if s == section}
            for section in SECTIONS}


def save_config(config: TrainConfig, path: str | Path) -> None:
    """The resolved config as YAML (atomic write); loadable again with `parse_config([path])`. A run from a saved
    model (init_from) keeps only the model flags it used: the others were not its model's, and read again they would
    be flags clashing with it (fit_init_from)."""
    settings = config_to_dict(config)
    if config.checkpoint.init_from:
        settings["model"] = {name: settings["model"][name] for name in used_with(config.checkpoint.init_from)}
    write_atomic(Path(path), yaml.safe_dump(settings, sort_keys=False))


def load_run_config(path: Path) -> TrainConfig:
    """A run's saved config.yaml, to rebuild its model; one that an init_from run wrote with its whole model section
    (before save_config left it out) is read without it."""
    pairs = load_yaml(path)
    if init_from := dict(pairs).get("checkpoint.init_from"):
        used = used_with(init_from)
        pairs = [(key, value) for key, value in pairs
                 if not key.startswith("model.") or key.removeprefix("model.") in used]
    config = build_config(pairs)
    fit_init_from(config, pairs)
    return config


def help_text(sections: Iterable[str], stage_defaults: dict) -> str:
    """The flags of `sections` with their defaults (the stage's where it has one), by section."""
    stage = {resolve(key): value for key, value in stage_defaults.items()}
    lines = ["flags, shown with their defaults (also YAML keys, flat or under their section, and --overrides key=value):",
             f"  --preset NAME: the model size, one of {', '.join(PRESETS)}"]
    for section in sections:
        flags = []
        for f, _ in declared_fields(SECTIONS[section]):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            value = stage.get((section, f.name), default)
            auto = value in (None, "auto") and (section, f.name) in AUTO
            shown = f"auto ({AUTO[section, f.name]})" if auto else repr(value)
            flags.append(f"--{NAMES[section, f.name]}={shown}")
        lines.append(f"{section}:")
        lines += textwrap.wrap("  ".join(flags), width=118, initial_indent="  ", subsequent_indent="  ",
                               break_long_words=False, break_on_hyphens=False)
    seeds = [f"--{alias}={seed_alias_text(target)}" for alias, target in SEED_ALIASES.items()
             if not isinstance(target, str) and target[0] is None or FLAGS[alias][0] in sections]
    lines.append("the seeds' flags (aliases, docs/training.md): --mode=<this stage>  --out_dir=out (the layout root: "
                 "writes out/<stage>)")
    lines += textwrap.wrap("  ".join(seeds), width=118, initial_indent="  ", subsequent_indent="  ",
                           break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def seed_alias_text(target: str | tuple) -> str:
    """`learning_rate`; `tracker=wandb|none` for a switch (true|false); `wandb_watch` for a value map; `always`."""
    if isinstance(target, str):
        return target
    name, values = target
    if name is None:
        return "always"
    if callable(values):
        return name
    if all(isinstance(v, bool) for v in values):
        off = "" if values[False] is None else f"|{values[False] or repr('')}"  # None: false sets nothing
        return f"{name}={values[True] or repr('')}{off}"
    return name


def switch(value: str) -> bool:
    """A command-line `1|0` (also true/false, yes/no, on/off)."""
    if value.lower() not in TRUE_WORDS + FALSE_WORDS:
        raise argparse.ArgumentTypeError(f"expected 1 or 0, got {value!r}")
    return value.lower() in TRUE_WORDS


def auto_switch(value: str) -> bool | None:
    """A command-line `auto|1|0`: auto is None, the program decides; else as `switch`."""
    if value.lower() == "auto":
        return None
    try:
        return switch(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, 1 or 0, got {value!r}") from None


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
    """The decoding settings of the chat (scripts/chat.py) and the server (mateconv.serve)."""
    parser.add_argument("--compile", type=auto_switch, default=None, metavar="auto|1|0",
                        help="torch.compile the decode step, as CUDA graphs on CUDA (model.generation.iter_tokens); "
                             "auto (default): on CUDA yes, on CPU no")
