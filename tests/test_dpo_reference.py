"""Precomputed reference log-probs give the same loss and metrics as an on-the-fly reference forward."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

from mateconv.config import DPOConfig
from mateconv.train.dpo import DPOError, DPOObjective
from mateconv.train.reference import (ReferenceLogps, WithReferenceLogps, compute_reference_logps,
                                      reference_cache_dir)

SEQ = 32


@pytest.fixture()
def setup(tmp_path, tiny_llama, random_dpo_pairs):
    data_dir = tmp_path / "tokens" / "dpo" / "train"
    data_dir.mkdir(parents=True)
    (data_dir / "index.json").write_text(json.dumps({"kind": "dpo", "shards": []}))
    (data_dir / "shard_0000.bin").write_bytes(b"pretend shard")
    ref_dir = tmp_path / "ref"
    tiny_llama(3).save_pretrained(ref_dir)
    return data_dir, ref_dir, random_dpo_pairs(11, SEQ, seed=5)


def test_precomputed_reference_matches_on_the_fly(setup, tiny_llama):
    data_dir, ref_dir, pairs = setup
    reference = tiny_llama(3)
    policy = tiny_llama(4).train()
    cache_dir = reference_cache_dir(data_dir, ref_dir, SEQ, torch.float32)
    assert cache_dir.parent.parent == data_dir and not ReferenceLogps.exists(cache_dir)
    # a batch size that does not divide the data, so the last batch is short and trimmed differently
    cache = compute_reference_logps(reference, pairs, cache_dir, batch_size=4, device="cpu")
    assert ReferenceLogps.exists(cache_dir) and cache.sums.shape == (11, 2)

    settings = DPOConfig(beta=0.1, kl_coef=0.05, sft_coef=0.3)
    cached_objective, live_objective = DPOObjective(settings), DPOObjective(settings, reference=reference)
    with_ref = WithReferenceLogps(pairs, cache)
    for cached_batch, live_batch in zip(DataLoader(with_ref, batch_size=3), DataLoader(pairs, batch_size=3)):
        cached_loss, cached_metrics = cached_objective.loss(policy, cached_batch)
        live_loss, live_metrics = live_objective.loss(policy, live_batch)
        assert abs(cached_loss.item() - live_loss.item()) < 1e-5
        for key, value in live_metrics.items():
            assert float(cached_metrics[key]) == pytest.approx(float(value), abs=1e-5), key
        assert live_metrics["kl_ref"] > 0  # policy differs from the reference, so the KL term is active
        cached_loss.backward()  # gradients flow through the policy only


def test_cache_key_follows_data_and_model(setup, tiny_llama):
    data_dir, ref_dir, _ = setup
    key = reference_cache_dir(data_dir, ref_dir, SEQ, torch.float32)
    assert reference_cache_dir(data_dir, ref_dir, SEQ, torch.float32) == key
    assert reference_cache_dir(data_dir, ref_dir, SEQ + 1, torch.float32) != key
    (data_dir / "shard_0000.bin").write_bytes(b"other shard")
    assert reference_cache_dir(data_dir, ref_dir, SEQ, torch.float32) != key
    tiny_llama(9).save_pretrained(ref_dir)
    assert reference_cache_dir(data_dir, ref_dir, SEQ, torch.float32) != key
    key = reference_cache_dir(data_dir, ref_dir, SEQ, torch.float32)
    weights = ref_dir.parent / "policy.pt"  # init_weights loaded into the reference
    torch.save({"state": tiny_llama(4).state_dict()}, weights)
    with_weights = reference_cache_dir(data_dir, ref_dir, SEQ, torch.float32, str(weights))
    assert with_weights != key
    torch.save({"state": tiny_llama(5).state_dict()}, weights)
    assert reference_cache_dir(data_dir, ref_dir, SEQ, torch.float32, str(weights)) != with_weights


def test_cache_errors_are_clear(setup, tmp_path):
    data_dir, ref_dir, pairs = setup
    with pytest.raises(DPOError, match="does not exist"):
        reference_cache_dir(data_dir, tmp_path / "missing", SEQ, torch.float32)
    with pytest.raises(DPOError, match="index.json"):
        reference_cache_dir(ref_dir, ref_dir, SEQ, torch.float32)
    with pytest.raises(DPOError, match="no reference"):
        DPOObjective(DPOConfig()).loss(torch.nn.Linear(1, 1), DataLoader(pairs, batch_size=2).__iter__().__next__())


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_llama, random_dpo_pairs):
    peft = pytest.importorskip("peft")
    base_copy = tiny_llama(6)
    lora = peft.get_peft_model(tiny_llama(6), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = next(iter(DataLoader(random_dpo_pairs(4, SEQ, seed=8), batch_size=4)))
    settings = DPOConfig(beta=0.1, kl_coef=0.05)
    lora_loss, lora_metrics = DPOObjective(settings).loss(lora, batch)
    copy_loss, copy_metrics = DPOObjective(settings, reference=base_copy).loss(lora, batch)
    torch.testing.assert_close(lora_loss, copy_loss)
    assert lora_metrics["kl_ref"] > 0 and lora_metrics["rewards/margins"] == pytest.approx(copy_metrics["rewards/margins"])
    lora_loss.backward()
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)


def test_kl_term_is_the_mean_over_response_tokens_without_indexing():
    """The k3 KL is a masked mean (no boolean indexing, whose data-dependent shape syncs with the host): it equals
    the mean over the masked tokens, and with no response token it is zero and still differentiable."""
    from mateconv.train.dpo import kl_per_token

    torch.manual_seed(0)
    policy, ref = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9)
    mask = torch.rand(4, 9) > 0.4
    r = (policy - ref)[mask]
    assert kl_per_token(policy, ref, mask).item() == pytest.approx((torch.exp(r) - r - 1).mean().item(), rel=1e-6)
    empty = kl_per_token(policy, ref, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0 and policy.grad is not None and not policy.grad.any()


def test_kl_ref_is_unbiased_for_responses_sampled_from_the_reference():
    """DPO's responses are offline, samples of (or imitated by) the reference, so kl_ref estimates KL(ref || policy)
    from them. With a token the policy has all but dropped (reference 0.84, policy 9e-4), as in the main job's DPO
    run, it stays near the exact 5.5 (the other direction's k3, computed before, read 773 here)."""
    from mateconv.train.dpo import kl_per_token

    torch.manual_seed(0)
    ref_logits = torch.tensor([3.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    policy_logits = ref_logits + torch.tensor([-8.0, 1.0, 0.5, 0.0, 0.3, 0.2])
    ref, policy = ref_logits.log_softmax(-1), policy_logits.log_softmax(-1)
    exact = (ref.exp() * (ref - policy)).sum().item()
    tokens = torch.multinomial(ref.exp(), 200_000, replacement=True)
    estimate = kl_per_token(policy[tokens][None], ref[tokens][None], torch.ones(1, len(tokens), dtype=torch.bool))
    assert estimate.item() == pytest.approx(exact, rel=0.03)


def test_a_moe_policy_adds_and_logs_its_balance_loss_in_training_only(random_dpo_pairs):
    """DPO on an MoE model: the router's balance loss joins the loss in training and is reported (`aux_loss`, logged
    as moe/aux_loss like pretraining's); an evaluation's loss is the preference loss alone."""
    from model import MateConvConfig, MateConvForCausalLM

    torch.manual_seed(0)
    config = MateConvConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=SEQ,
                            use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    policy, reference = MateConvForCausalLM(config), MateConvForCausalLM(config)
    batch = next(iter(DataLoader(random_dpo_pairs(4, SEQ, seed=3), batch_size=4)))
    objective = DPOObjective(DPOConfig(beta=0.1), reference=reference.eval())
    loss, metrics = objective.loss(policy.train(), batch)
    assert metrics["aux_loss"] > 0 and loss.item() == pytest.approx((metrics["dpo_loss"] + metrics["aux_loss"]).item())
    with torch.no_grad():
        loss, metrics = objective.loss(policy.eval(), batch)
    assert "aux_loss" not in metrics and loss.item() == pytest.approx(metrics["dpo_loss"].item())


def real_token_load(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The expert load over the real tokens of right-padded rows: each row alone, cut to its length, weighted by it."""
    lengths = mask.sum(-1).tolist()
    loads = []
    for row, n in zip(ids, lengths):
        model(row[None, :n])
        loads.append(model.expert_load() * n)
    return sum(loads) / sum(lengths)


def moe_policy(seed: int = 0):
    from model import MateConvConfig, MateConvForCausalLM

    torch.manual_seed(seed)
    return MateConvForCausalLM(MateConvConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                              max_seq_len=SEQ, use_moe=True, n_routed_experts=4,
                                              num_experts_per_tok=2))


def test_a_moe_policy_counts_the_real_tokens_only(random_dpo_pairs):
    """The policy's expert load after a DPO loss (what the engine logs as moe/...) and its balance loss leave out the
    padding of the shorter rows; before, every position of the stacked chosen and rejected rows counted."""
    policy, reference = moe_policy(0), moe_policy(1).eval()
    batch = next(iter(DataLoader(random_dpo_pairs(4, SEQ, seed=3), batch_size=4)))
    _, metrics = DPOObjective(DPOConfig(beta=0.1), reference=reference).loss(policy.train(), batch)
    load = policy.expert_load()
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    assert mask.float().mean() < 0.8  # padding enough to tell
    torch.testing.assert_close(load, real_token_load(policy, ids, mask))
    alone = torch.stack([policy(row[None, :n]).aux_loss for row, n in zip(ids, mask.sum(-1).tolist())]).mean()
    torch.testing.assert_close(metrics["aux_loss"], alone)  # per-sequence balance loss over real tokens


def test_a_lora_reference_forward_leaves_the_policy_expert_load(random_dpo_pairs):
    """With LoRA the reference is the policy with its adapters disabled, the same MoE layers: its forward runs first,
    so the load the engine reads after the loss is the policy's own (before, the reference's overwrote it)."""
    peft = pytest.importorskip("peft")
    policy = peft.get_peft_model(moe_policy(0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    batch = next(iter(DataLoader(random_dpo_pairs(4, SEQ, seed=3), batch_size=4)))
    DPOObjective(DPOConfig(beta=0.1)).loss(policy.train(), batch)
    load = policy.base_model.model.expert_load()
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    torch.testing.assert_close(load, real_token_load(policy.base_model.model, ids, mask))
    with policy.disable_adapter():
        assert not torch.allclose(real_token_load(policy.base_model.model, ids, mask), load)


def test_held_out_metrics_are_means_over_pairs_and_tokens_as_computed_by_hand(tiny_llama, random_dpo_pairs):
    """The held-out figures are those of the pairs, whatever the batch size: 5 pairs in batches of 2 weighed the last
    pair like two (accuracy 2/3 where 3 of 5 pairs were right). kl_ref and nll/chosen are means over every chosen
    response token, as docs/dpo.md says, and val_loss adds them to the mean pair loss: each batch's token mean
    weighed by its pairs moved kl_ref with the batch size (5% here). Computed here token by token."""
    from mateconv.train.evaluators import preference_eval

    policy, reference = tiny_llama(0), tiny_llama(1)
    settings = DPOConfig(beta=0.3, kl_coef=0.2, sft_coef=0.5)
    pairs = random_dpo_pairs(5, 16)

    def label_logps(model, item, side):
        ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
        with torch.no_grad():
            logps = model(ids[None]).logits[0].log_softmax(-1)
        return [logps[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100]

    def reward(item, side):
        return settings.beta * (sum(label_logps(policy, item, side)) - sum(label_logps(reference, item, side)))

    chosen, rejected = [reward(p, "chosen") for p in pairs], [reward(p, "rejected") for p in pairs]
    policy_tokens = [label_logps(policy, p, "chosen") for p in pairs]  # per pair: its chosen response's tokens
    reference_tokens = [label_logps(reference, p, "chosen") for p in pairs]
    ratios = [a - b for pair in zip(policy_tokens, reference_tokens) for a, b in zip(*pair)]
    by_hand = {"rewards/chosen": sum(chosen) / 5, "rewards/rejected": sum(rejected) / 5,
               "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / 5,
               "rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected)) / 5,
               "dpo_loss": sum(math.log1p(math.exp(r - c)) for c, r in zip(chosen, rejected)) / 5,
               "kl_ref": sum(math.exp(r) - r - 1 for r in ratios) / len(ratios),
               "nll/chosen": -sum(map(sum, policy_tokens)) / len(ratios)}
    by_hand["loss"] = by_hand["dpo_loss"] + 0.2 * by_hand["kl_ref"] + 0.5 * by_hand["nll/chosen"]
    assert 0 < by_hand["rewards/accuracies"] < 1 and len(set(map(len, policy_tokens))) > 1  # lengths vary
    objective = DPOObjective(settings, reference)
    for batch_size in (2, 5):
        measured = preference_eval(policy, objective, pairs, batch_size, "cpu")
        for key, value in by_hand.items():
            assert measured[key] == pytest.approx(value, abs=1e-5), (batch_size, key)
