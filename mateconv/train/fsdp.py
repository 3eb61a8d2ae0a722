"""PyTorch FSDP (`--engine fsdp`, fully_shard): each rank holds a 1/world_size shard of every parameter, gradient and
optimizer state; a layer's full weights exist only while it runs.

The sharding unit is each transformer block (the classes a Hugging Face model names in `_no_split_modules`: MateConv's
decoder layer, Llama's, Qwen's, ...), then the rest of the model (embeddings, final norm, a tied lm_head) as one unit.
Compiling (`--compile`, the default on CUDA) compiles each block before it is sharded, so the gathers stay outside the
compiled graphs.

Checkpoints gather the full model and optimizer state onto rank 0 (`training_state.pt`, optimizer state keyed by
parameter name): a checkpoint of one engine resumes on the other (`torch` single process or DDP, `fsdp`), and on any
number of ranks.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import fully_shard

from mateconv.config import ConfigError

NAMED_OPTIMIZER_STATE = "optimizer_by_name"  # training_state.pt's key for an optimizer state keyed by parameter name


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: its modules of the classes the model names in `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: nn.Module, compile_blocks: bool) -> nn.Module:
    """fully_shard each block, then the whole model (in place; the model's class becomes FSDP<class>)."""
    found = blocks(model)
    if not found:
        raise ConfigError(f"engine fsdp: {type(model).__name__} names no transformer block class (_no_split_modules) "
                          "to shard by; use --engine torch or deepspeed")
    for block in found:
        if compile_blocks:
            block.compile()
        fully_shard(block)
    fully_shard(model)
    return model


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on rank 0's CPU (an empty dict on the other ranks). Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The model and optimizer state in full on rank 0's CPU (empty on the other ranks), the optimizer's keyed by
    parameter name. Collective."""
    weights, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": weights, NAMED_OPTIMIZER_STATE: optimizer_state}


def by_name(optimizer_state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict keyed by position (`optimizer.state_dict()`) re-keyed by parameter name, for an
    optimizer built like `optimizer` over the same model (the same groups, the parameters in the same order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    position_to_name = {}
    for group, saved in zip(optimizer.param_groups, optimizer_state["param_groups"]):
        position_to_name.update(zip(saved["params"], (names[id(p)] for p in group["params"])))
    return {"state": {position_to_name[k]: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [position_to_name[k] for k in g["params"]]}
                             for g in optimizer_state["param_groups"]]}


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Full weights and optimizer state (`saved` as torch.load gives training_state.pt, on every rank) into a sharded
    or plain model: each rank keeps its own shard."""
    optimizer_state = saved.get(NAMED_OPTIMIZER_STATE) or by_name(saved["optimizer"], model, optimizer)
    set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
