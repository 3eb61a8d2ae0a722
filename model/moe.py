"""DeepSeek-style Mixture-of-Experts FFN: shared experts + top-k routed experts with an auxiliary balance loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MateConvConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the dense FFN and every expert (Hugging Face Llama parameter names)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Routes each token to `num_experts_per_tok` of `n_routed_experts` SwiGLU experts, adds the shared experts.

    forward(x [B, T, dim]) -> (y [B, T, dim], aux_loss scalar). One module holding the router and all experts, so
    DeepSpeed ZeRO-3 can treat it as a leaf (`deepspeed.utils.set_z3_leaf_modules(model, [MoEFeedForward])`).
    Every expert runs every step (on an empty batch if no token picked it), so all parameters always get a gradient
    (zero for idle experts) and DDP/ZeRO see the same graph on every rank.

    The (token, expert) pairs are sorted by expert; `moe_impl` picks how the experts then run: "grouped" as two
    grouped GEMMs over the experts' weights stacked per forward (`torch._grouped_mm`: no host sync, fixed shapes, so
    torch.compile keeps one graph), "loop" one expert after the other on its slice, "auto" grouped where
    `grouped_mm_supported` says the kernel takes the compute dtype. The parameters are the same either way.
    """

    def __init__(self, config: MateConvConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.impl = config.moe_impl
        self.aux_loss_alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.gate = nn.Linear(config.dim, config.n_routed_experts, bias=False)  # router
        self.experts = nn.ModuleList(SwiGLU(config.dim, config.hidden_dim) for _ in range(config.n_routed_experts))
        self.shared_experts = (SwiGLU(config.dim, config.hidden_dim * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)
        self.last_load: torch.Tensor | None = None  # share of the real tokens' picks per expert, last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (scores [N, E] fp32, top-k weights [N, k], top-k expert ids [N, k])."""
        scores = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(scores, self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights, experts

    def balance_loss(self, scores: torch.Tensor, experts: torch.Tensor, batch: int,
                     real: torch.Tensor | None = None) -> torch.Tensor:
        """aux_loss_alpha * sum_e f_e * P_e, with f_e the routed-token share scaled so a uniform load gives f_e = 1
        and P_e the mean router probability; per sequence (`seq_aux`) or over the whole batch. `real` [B*T] is 1 on
        the tokens that count and 0 on padding (as Hugging Face's load_balancing_loss_func with an attention_mask);
        None counts every position."""
        if self.aux_loss_alpha == 0:
            return scores.new_zeros(())
        rows = batch if self.seq_aux else 1
        scores, picks = scores.view(rows, -1, self.n_experts), experts.view(rows, -1)
        if real is None:
            weight, tokens = torch.ones_like(picks, dtype=scores.dtype), picks.shape[1] / self.top_k
            mean_scores = scores.mean(dim=1)
        else:
            real = real.view(rows, -1, 1).to(scores.dtype)
            tokens = real.sum(dim=1).clamp(min=1)  # [rows, 1]
            mean_scores = (scores * real).sum(dim=1) / tokens
            weight = real.expand(-1, -1, self.top_k).reshape(rows, -1)
        counts = scores.new_zeros(rows, self.n_experts).scatter_add_(1, picks, weight)
        picked = tokens * self.top_k
        # the two orders of operations as before masks: packed pretraining's figures stay the same bit for bit
        share = counts / (picked / self.n_experts) if self.seq_aux else counts / picked * self.n_experts
        per_row = (share * mean_scores).sum(dim=1)
        if real is None:
            return per_row.mean() * self.aux_loss_alpha
        # the mean over the rows holding a real token: a row of padding alone would scale the others' loss down
        return per_row.sum() / (real.sum(dim=(1, 2)) > 0).sum().clamp(min=1) * self.aux_loss_alpha

    def load_share(self, assigned: torch.Tensor, counts: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Fraction of the routed picks each expert got, over the real tokens only when `real` marks them. Stays on
        the device: the engine adds it up and reads it on log steps."""
        if real is None:
            return (counts.float() / assigned.numel()).detach()
        picks = real.float().repeat_interleave(self.top_k)
        real_counts = picks.new_zeros(self.n_experts).scatter_add_(0, assigned, picks)
        return (real_counts / picks.sum().clamp(min=1)).detach()

    def grouped_refusal(self, device: torch.device, dtype: torch.dtype, compiling: bool) -> str | None:
        """Why `moe_impl grouped` cannot run here (None when it can, or when another impl is asked for)."""
        shape = self.experts[0].gate_proj.weight.shape
        if self.impl != "grouped" or grouped_mm_supported(device, dtype, shape, compiling):
            return None
        return (f"moe_impl grouped: torch._grouped_mm does not take {dtype} on {device.type} for experts of shape "
                f"{tuple(shape)}{' under torch.compile' if compiling else ''}; use moe_impl auto")

    def use_grouped(self, x: torch.Tensor) -> bool:
        dtype, compiling = compute_dtype(x), torch.compiler.is_compiling()
        supported = grouped_mm_supported(x.device, dtype, self.experts[0].gate_proj.weight.shape, compiling)
        if self.impl == "grouped" and not supported:
            raise RuntimeError(self.grouped_refusal(x.device, dtype, compiling))
        layers = [layer for e in self.experts for layer in (e.gate_proj, e.up_proj, e.down_proj)]
        return supported and self.impl != "loop" and plain_linears(*layers)

    def looped_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return torch.cat([expert(part) for expert, part in zip(self.experts, tokens.split(counts.tolist()))])

    def grouped_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(tokens)
        ends = counts.cumsum(0).to(torch.int32)
        hidden = self.experts[0].gate_proj.weight.shape[0]
        # [E, 2*hidden, dim]: each expert's gate rows then its up rows (one copy of the weights, not two)
        gate_up = torch.stack([w for e in self.experts for w in (e.gate_proj.weight, e.up_proj.weight)])
        gate_up = gate_up.view(self.n_experts, 2 * hidden, -1).to(dtype)
        down = torch.stack([e.down_proj.weight for e in self.experts]).to(dtype)  # [E, dim, hidden]
        gate, up = torch._grouped_mm(tokens.to(dtype), gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=ends)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """token_mask [B, T]: 1 on real tokens, 0 on padding, which the expert load and the balance loss leave out
        (padding is still computed, its output unused); None counts every position, as in packed pretraining."""
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        scores, weights, experts = self.route(flat)
        # Sort the (token, expert) assignments by expert: each expert's tokens form one contiguous slice.
        assigned = experts.flatten()
        order = assigned.argsort(stable=True)
        token_of = order // self.top_k
        counts = assigned.new_zeros(self.n_experts).scatter_add_(0, assigned, torch.ones_like(assigned))
        run = self.grouped_experts if self.use_grouped(x) else self.looped_experts
        outputs = run(flat[token_of], counts)
        outputs = outputs * weights.flatten()[order].unsqueeze(-1).to(outputs.dtype)
        y = outputs.new_zeros(flat.shape).index_add_(0, token_of, outputs)  # autocast: experts may run in bf16
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        real = None if token_mask is None else token_mask.reshape(-1)
        self.last_load = self.load_share(assigned, counts, real)
        return y.view(batch, seq, dim), self.balance_loss(scores, experts, batch, real)


def plain_linears(*modules: nn.Module) -> bool:
    """True when every module is a bare nn.Linear, whose weight alone is its function. An adapter (peft's LoRA) or a
    quantised layer wraps it: reading .weight would skip the adapter, so such modules must be called."""
    return all(type(module) is nn.Linear for module in modules)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products on `x` run in: autocast's when it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, expert_shape: torch.Size,
                         compiling: bool | None = None) -> bool:
    """Whether torch._grouped_mm runs the experts here: bf16 (its kernel dtype, on CUDA and CPU, also compiled), or
    fp32 on CPU outside torch.compile (whose shape rules admit bf16 only); every row stride a multiple of 16 bytes.
    `compiling` None: whether this call is being compiled."""
    if not hasattr(torch, "_grouped_mm") or device.type not in ("cuda", "cpu"):
        return False
    compiling = torch.compiler.is_compiling() if compiling is None else compiling
    aligned = all(size * dtype.itemsize % 16 == 0 for size in expert_shape)
    eager_cpu_fp32 = dtype == torch.float32 and device.type == "cpu" and not compiling
    return aligned and (dtype == torch.bfloat16 or eager_cpu_fp32)
