"""The model a stage trains: a new MateConv model, or any Hugging Face causal LM (`init_from`); LoRA; HF saving."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import model as mateconv_model  # registers MateConv with the Auto classes
from mateconv.config import ConfigError, TrainConfig
from mateconv.files import atomic_dir
from mateconv.train.checkpoint import unwrap
from mateconv.train.distributed import Runtime, barrier

SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "vocab_size", "rope_theta", "dropout",
                "norm_eps", "multiple_of", "hidden_dim", "flash_attn", "use_moe", "n_routed_experts",
                "num_experts_per_tok", "n_shared_experts", "aux_loss_alpha", "seq_aux", "norm_topk_prob")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (transformers renamed the method; v6 drops the old)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(config: TrainConfig) -> nn.Module:
    """fp32 weights on the CPU; the engine moves/casts them. Model-shape flags are ignored with init_from."""
    from transformers import AutoModelForCausalLM

    if config.init_from:
        try:  # a local save_pretrained directory, or a hub id where downloads are possible
            model = AutoModelForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ConfigError(f"init_from: cannot load a causal LM from {config.init_from} "
                              f"({str(e).splitlines()[0]})") from None
    else:
        try:
            model_config = mateconv_model.MateConvConfig(**{name: getattr(config, name) for name in SHAPE_FIELDS})
        except mateconv_model.ConfigError as e:
            raise ConfigError(str(e)) from None
        model = mateconv_model.MateConvForCausalLM(model_config)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if config.use_lora:
        model = add_lora(model, config)
    return model


def add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in config.lora_target_modules if t in present]
    if not targets:
        raise ConfigError(f"lora_target_modules {config.lora_target_modules} match no module of the model")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DeepSpeed/DDP and PEFT wrappers."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "peft_config") else inner


def load_tokenizer(config: TrainConfig):
    """The tokenizer saved with the model: from init_from if it has one, else tokenizer_path; None if neither."""
    from transformers import AutoTokenizer

    for path in (config.init_from, config.tokenizer_path):
        if path and (Path(path) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(path)
    if config.init_from and not Path(config.init_from).exists():
        try:
            return AutoTokenizer.from_pretrained(config.init_from)  # a hub id
        except (OSError, ValueError):
            return None
    return None


def gather_state_dict(engine, runtime: Runtime) -> dict | None:
    """Full weights on rank 0 under ZeRO-3 (collective); None means 'use the module's own state dict'."""
    if runtime.use_deepspeed and engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return None


def save_hf(engine, tokenizer, target: str | Path, runtime: Runtime) -> Path:
    """Hugging Face format (`save_pretrained` + tokenizer), written atomically; LoRA adapters are merged in.

    Collective under ZeRO-3 (every rank must call it); only rank 0 writes.
    """
    target = Path(target)
    state_dict = gather_state_dict(engine, runtime)
    if runtime.is_main:
        module = unwrap(engine)
        if hasattr(module, "peft_config"):
            module = copy.deepcopy(module).merge_and_unload()
        with atomic_dir(target) as tmp:
            module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    barrier()
    return target
