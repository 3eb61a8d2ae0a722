"""Optimizers (AdamW; Muon for hidden matrices + AdamW for the rest) and the warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from mateconv.config import OptimConfig

ROUTER_NAMES = ("router", "mlp.gate.", "block_sparse_moe.gate.")


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton–Schulz orthogonalisation in a chosen dtype.

    torch runs it in bf16, which is fast on GPUs and ~30x slower than fp32 on CPUs without bf16 units, so CPU
    training passes `ns_dtype=torch.float32`. The update rule, state layout and learning-rate scaling are torch's.
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                rows, cols = param.shape[:2]
                scale = math.sqrt(max(1.0, rows / cols))  # torch's "original" adjust_lr_fn
                if group["adjust_lr_fn"] == "match_rms_adamw":
                    scale = 0.2 * math.sqrt(max(rows, cols))
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"] * scale)
        return loss


def orthogonalise(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Quintic Newton–Schulz iteration towards the nearest semi-orthogonal matrix (Muon's update direction)."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def muon_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters Muon should update: 2-D hidden weights (not embeddings, lm_head or MoE routers)."""
    excluded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        excluded |= {id(p) for p in output.parameters()}
    chosen = set()
    for name, param in model.named_parameters():
        if param.requires_grad and param.ndim == 2 and id(param) not in excluded \
                and not any(key in name for key in ROUTER_NAMES) and "lm_head" not in name:
            chosen.add(id(param))
    return chosen


def adamw_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over everything, or (optimizer=muon) a Muon + AdamW pair combined in one optimizer object."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = (optim.adam_beta1, optim.adam_beta2)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(adamw_groups(named, optim.weight_decay), lr=optim.learning_rate, betas=betas,
                                 fused=True)
    chosen = muon_parameters(model)
    hidden = [p for _, p in named if id(p) in chosen]
    rest = [(n, p) for n, p in named if id(p) not in chosen]
    ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = []  # a part without parameters is left out: LoRA's adapters, all matrices, leave AdamW none
    if hidden:
        parts.append(Muon(hidden, ns_dtype=ns_dtype, lr=optim.muon_lr, momentum=optim.muon_momentum,
                          weight_decay=optim.weight_decay))
    if rest:
        parts.append(torch.optim.AdamW(adamw_groups(rest, optim.weight_decay), lr=optim.learning_rate, betas=betas,
                                       fused=True))
    return CombinedOptimizer(parts)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped together, exposing their param groups as one list (for schedulers and clipping)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.defaults = {}
        self.state = {}  # each part keeps its own state; see state_dict

    @property
    def param_groups(self) -> list[dict]:
        """The parts' groups as they are now: loading a checkpoint replaces them, and a list taken once would leave
        the schedule setting the rates of groups no part steps any more."""
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, part in zip(self.optimizers, state_dict["parts"]):
            optimizer.load_state_dict(part)


# The param-group settings that come from the run's flags (initial_lr: where the schedule starts from).
GROUP_SETTINGS = {"initial_lr": "learning rate", "weight_decay": "weight decay", "betas": "betas",
                  "momentum": "momentum"}


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings of GROUP_SETTINGS, as this run's flags set them."""
    return [{key: group[key] for key in GROUP_SETTINGS if key in group} for group in optimizer.param_groups]


def restore_group_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                           settings: list[dict]) -> list[str]:
    """Puts this run's `settings` back after a checkpoint loaded its own run's into the param groups (and the
    scheduler's base rates), so that a flag changed for the resume takes effect from the resumed step; returns the
    changes as 'learning rate 0.003 -> 0.001'."""
    changes = []
    for group, own in zip(optimizer.param_groups, settings):
        for key, value in own.items():
            saved = group.get(key)
            change = f"{GROUP_SETTINGS[key]} {_as_tuple(saved)} -> {_as_tuple(value)}"
            if _as_tuple(saved) != _as_tuple(value) and change not in changes:
                changes.append(change)
        group.update(own)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, rule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * rule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from 1 to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    """`warmup_ratio` of the run when set (the seeds' DPO setting), else `warmup_iters`."""
    return round(optim.warmup_ratio * total_steps) if optim.warmup_ratio > 0 else optim.warmup_iters


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(optim, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup, total_steps, optim.min_lr_ratio))
