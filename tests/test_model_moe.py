"""DeepSeek-style MoE FFN: routing, balance loss, expert load, gradients."""
from __future__ import annotations

import pytest
import torch

from model import MateConvConfig, MateConvForCausalLM, MoEFeedForward
from model.moe import grouped_mm_supported


def moe_config(**overrides) -> MateConvConfig:
    fields = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, max_seq_len=64, use_moe=True,
                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    return MateConvConfig(**{**fields, **overrides})


def reference_moe(block: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token evaluation of the same routing (the slow obvious way)."""
    flat = x.reshape(-1, x.shape[-1])
    scores = torch.softmax(block.gate(flat), dim=-1)
    rows = []
    for token, probs in zip(flat, scores):
        weights, experts = probs.topk(block.top_k)
        weights = weights / weights.sum()
        out = sum(w * block.experts[int(e)](token) for w, e in zip(weights, experts))
        rows.append(out + block.shared_experts(token))
    return torch.stack(rows).view_as(x)


def test_grouped_dispatch_matches_per_token_reference():
    torch.manual_seed(0)
    block = MoEFeedForward(moe_config())
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        y, _ = block(x)
        assert (y - reference_moe(block, x)).abs().max() < 1e-5


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_goes_to_exactly_k_experts(top_k):
    torch.manual_seed(0)
    block = MoEFeedForward(moe_config(num_experts_per_tok=top_k))
    x = torch.randn(2, 9, 32)
    _, weights, experts = block.route(x.reshape(-1, 32))
    assert experts.shape == (18, top_k)
    assert all(len(set(row.tolist())) == top_k for row in experts)
    if top_k > 1:  # norm_topk_prob renormalises the chosen experts' weights
        assert torch.allclose(weights.sum(-1), torch.ones(18))
    block(x)
    assert block.last_load.sum().item() == pytest.approx(1.0)


def forced_router(block: MoEFeedForward, x: torch.Tensor, skewed: bool) -> None:
    """Gate weights that route by the first four input features (balanced) or send every token to experts 0 and 1
    (skewed)."""
    with torch.no_grad():
        block.gate.weight.zero_()
        if skewed:
            x[..., 0] = 1.0
            block.gate.weight[0, 0], block.gate.weight[1, 0] = 5.0, 4.0
        else:
            for expert in range(4):
                block.gate.weight[expert, expert] = 5.0


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_lower_when_balanced(seq_aux):
    losses = {}
    for skewed in (False, True):
        torch.manual_seed(0)
        block = MoEFeedForward(moe_config(seq_aux=seq_aux, aux_loss_alpha=0.1))
        # token t prefers experts t % 4 (first) and (t + 1) % 4 (second) in the balanced case
        pattern = torch.eye(4) + 0.9 * torch.eye(4).roll(1, dims=1)
        x = torch.zeros(2, 16, 32)
        x[..., :4] = pattern.repeat(8, 1).view(2, 16, 4)
        forced_router(block, x, skewed)
        _, aux = block(x)
        losses[skewed] = aux.item()
        expected_load = torch.tensor([0.5, 0.5, 0.0, 0.0]) if skewed else torch.full((4,), 0.25)
        assert torch.allclose(block.last_load, expected_load)
    assert 0 < losses[False] < losses[True]
    # Balanced: share 1 per expert and mean probability ~1/4 each -> alpha * 1; skewed: about alpha * 2.
    assert losses[False] == pytest.approx(0.1, rel=0.05)
    assert losses[True] > 0.18


def test_model_expert_load_and_aux_in_loss():
    torch.manual_seed(0)
    model = MateConvForCausalLM(moe_config()).train()
    input_ids = torch.randint(3, 61, (2, 12))
    assert model.expert_load() is None  # nothing routed yet
    output = model(input_ids, labels=input_ids)
    load = model.expert_load()
    assert load.shape == (2, 4) and torch.allclose(load.sum(-1), torch.ones(2))
    assert output.aux_loss.item() > 0
    no_aux = torch.nn.functional.cross_entropy(output.logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    assert output.loss.item() == pytest.approx(no_aux.item() + output.aux_loss.item(), abs=1e-5)
    with torch.no_grad():  # an evaluation's loss is the cross-entropy alone (a perplexity from .loss is right)
        assert model.eval()(input_ids, labels=input_ids).loss.item() == pytest.approx(no_aux.item(), abs=1e-5)
    dense = MateConvForCausalLM(moe_config(use_moe=False))
    dense(input_ids)
    assert dense.expert_load() is None


def test_gradients_reach_exactly_the_used_experts():
    torch.manual_seed(0)
    block = MoEFeedForward(moe_config(aux_loss_alpha=0.0))
    x = torch.zeros(1, 8, 32)
    x[..., 0] = 1.0
    with torch.no_grad():  # every token -> experts 0 and 2 only
        block.gate.weight.zero_()
        block.gate.weight[0, 0], block.gate.weight[2, 0] = 5.0, 4.0
    y, _ = block(x + 0.01 * torch.randn_like(x))
    y.square().sum().backward()
    for index, expert in enumerate(block.experts):
        norm = sum(p.grad.abs().sum().item() for p in expert.parameters())
        assert (norm > 0) == (index in (0, 2)), f"expert {index} gradient norm {norm}"
    assert block.gate.weight.grad.abs().sum() > 0
    assert block.shared_experts.gate_proj.weight.grad.abs().sum() > 0


def test_moe_runs_under_bf16_autocast():
    """Mixed precision (as DeepSpeed/CUDA training uses it): experts compute in bf16 while the residual stays fp32."""
    torch.manual_seed(0)
    model = MateConvForCausalLM(moe_config())
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    reference = model(ids, labels=ids).loss
    assert abs(out.loss.item() - reference.item()) < 0.1


def twin_blocks(**overrides) -> tuple[MoEFeedForward, MoEFeedForward]:
    """The same weights run as grouped GEMMs and as the loop over experts."""
    torch.manual_seed(0)
    grouped = MoEFeedForward(moe_config(moe_impl="grouped", **overrides))
    looped = MoEFeedForward(moe_config(moe_impl="loop", **overrides))
    looped.load_state_dict(grouped.state_dict())
    return grouped, looped


def test_grouped_gemm_matches_the_loop_forward_and_backward():
    grouped, looped = twin_blocks()
    x = torch.randn(3, 11, 32)
    x[0, :, 0] = 3.0  # a skewed router input, so the experts get unequal (and possibly empty) slices
    outputs = {}
    for name, block in (("grouped", grouped), ("loop", looped)):
        inp = x.clone().requires_grad_()
        y, aux = block(inp)
        (y.square().sum() + aux).backward()
        outputs[name] = (y, inp.grad, {n: p.grad for n, p in block.named_parameters()})
    (y_g, dx_g, grads_g), (y_l, dx_l, grads_l) = outputs["grouped"], outputs["loop"]
    assert torch.allclose(y_g, y_l, atol=1e-5) and torch.allclose(dx_g, dx_l, atol=1e-4)
    assert grads_g.keys() == grads_l.keys() and len(grads_g) == 16  # router + 4 experts x 3 + shared x 3
    for name in grads_g:
        assert torch.allclose(grads_g[name], grads_l[name], atol=1e-4), name


def test_grouped_gemm_under_bf16_autocast_within_bf16_tolerance():
    grouped, looped = twin_blocks()
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_g, _ = grouped(x)
        y_l, _ = looped(x)
    assert y_g.dtype == torch.bfloat16
    assert (y_g.float() - y_l.float()).abs().max() < 2e-2 * y_l.float().abs().max()


def test_auto_falls_back_to_the_loop_where_grouped_gemm_cannot_run(monkeypatch):
    """hidden 100 x bf16 = 200 bytes per row: not a multiple of 16, which torch._grouped_mm needs."""
    auto = MoEFeedForward(moe_config(hidden_dim=100))
    x = torch.randn(2, 5, 32)
    shape = auto.experts[0].gate_proj.weight.shape
    assert grouped_mm_supported(x.device, torch.float32, shape)
    assert not grouped_mm_supported(x.device, torch.bfloat16, shape)
    called = []
    loop = MoEFeedForward.looped_experts
    monkeypatch.setattr(MoEFeedForward, "looped_experts", lambda self, *args: called.append(1) or loop(self, *args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto(x)
    assert called
    forced = MoEFeedForward(moe_config(hidden_dim=100, moe_impl="grouped"))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="moe_impl grouped"):
        forced(x)


@pytest.mark.parametrize("use_moe", [False, True])
def test_lora_adapters_on_every_projection_take_part_in_the_forward(use_moe):
    """LoRA on q/k/v and on the routed experts: the fused q/k/v matmul and the grouped expert GEMM read raw weights,
    which skipped the adapters (their lora_B never trained and the merged model differed from the trained one).
    Now the adapted model is the merged model, and each target changes the output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = moe_config(dim=64, use_moe=use_moe, moe_impl="auto")
    ids = torch.randint(0, 61, (2, 12))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for target in targets:
        model = MateConvForCausalLM(config).eval()
        with torch.no_grad():
            base = model(ids).logits
        adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[target]))
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=0.5)
        with torch.no_grad():
            logits = adapted(ids).logits
            merged = adapted.merge_and_unload()(ids).logits
        assert (logits - base).abs().max() > 1e-3, target
        assert (logits - merged).abs().max() < 1e-4, target


def padded_rows(lengths: list[int], width: int, pad_id: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows of random tokens (the same tokens for the same lengths and seed) -> (ids, token_mask)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), pad_id)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 61, (n,), generator=generator)
    return ids, (torch.arange(width) < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("seq_aux", [True, False])
def test_padding_counts_in_neither_expert_load_nor_balance_loss(seq_aux):
    """SFT and DPO rows are mostly padding: a token_mask leaves it out, so more padding, a row of padding alone, or
    other pad ids, change nothing. Before, the router's picks for the padding were counted as expert load and in the
    balance loss, and a row of padding alone still counted as a row in the per-sequence loss's mean."""
    torch.manual_seed(0)
    model = MateConvForCausalLM(moe_config(seq_aux=seq_aux)).train()
    figures = []
    for width, pad_id, lengths in ((8, 0, [3, 8, 5]), (40, 0, [3, 8, 5]), (40, 7, [3, 8, 5]), (8, 0, [3, 8, 5, 0])):
        ids, mask = padded_rows(lengths, width, pad_id)
        aux = model(ids, token_mask=mask).aux_loss
        figures.append((aux, model.expert_load()))
    for aux, load in figures[1:]:
        torch.testing.assert_close(aux, figures[0][0])
        torch.testing.assert_close(load, figures[0][1])


def test_masked_figures_are_those_of_each_row_alone():
    """Per-sequence balance loss (seq_aux) and the load over a padded batch equal those of its rows run one by one
    without padding (load weighted by each row's tokens), as Hugging Face's load_balancing_loss_func with an
    attention_mask counts only real tokens. A 2-D attention_mask serves as the token_mask."""
    torch.manual_seed(0)
    model = MateConvForCausalLM(moe_config(seq_aux=True)).train()
    lengths = [4, 6, 9]
    ids, mask = padded_rows(lengths, 32, pad_id=0)
    aux, load = model(ids, attention_mask=mask).aux_loss, model.expert_load()
    alone = [(model(ids[row:row + 1, :n]).aux_loss, model.expert_load() * n) for row, n in enumerate(lengths)]
    torch.testing.assert_close(aux, torch.stack([a for a, _ in alone]).mean())
    torch.testing.assert_close(load, sum(w for _, w in alone) / sum(lengths))
    assert model(ids, attention_mask=mask, token_mask=torch.ones_like(mask)).aux_loss != aux  # token_mask wins


@pytest.mark.parametrize("seq_aux", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_packed_pretraining_figures_are_unchanged_bit_for_bit(seq_aux, top_k):
    """No mask (packed pretraining rows): every position counts, with the operations the unmasked formulas always
    had, so pretraining's aux loss, expert load and router gradient stay the same bit for bit."""
    import torch.nn.functional as F

    torch.manual_seed(top_k)
    model = MateConvForCausalLM(moe_config(seq_aux=seq_aux, num_experts_per_tok=top_k, n_routed_experts=6,
                                           document_mask=True)).train()
    block = model.model.layers[0].mlp
    routed = []
    block.gate.register_forward_hook(lambda module, inputs, logits: routed.append(logits))
    ids = torch.randint(0, 61, (3, 37))
    positions = torch.cat([torch.arange(20), torch.arange(17)]).expand(3, -1)
    model(ids, position_ids=positions)
    scores = F.softmax(routed[0].float(), dim=-1)
    picks = torch.topk(scores, top_k, dim=-1)[1]
    counts = torch.zeros(6, dtype=torch.long).scatter_add_(0, picks.flatten(), torch.ones_like(picks.flatten()))
    assert torch.equal(block.last_load, counts.float() / picks.numel())
    if seq_aux:  # the formulas as written before token masks
        row_picks = picks.view(3, -1)
        row_counts = torch.zeros(3, 6).scatter_add_(1, row_picks, torch.ones_like(row_picks, dtype=torch.float))
        share = row_counts / (row_picks.shape[1] / 6)
        expected = (share * scores.view(3, -1, 6).mean(dim=1)).sum(dim=1).mean() * block.aux_loss_alpha
    else:
        share = F.one_hot(picks.flatten(), 6).float().mean(0) * 6
        expected = (share * scores.mean(0)).sum() * block.aux_loss_alpha
    assert torch.equal(block.balance_loss(scores, picks, 3), expected)
