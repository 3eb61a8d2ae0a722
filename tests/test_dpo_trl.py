"""The DPO losses and reward metrics equal TRL's DPOTrainer on the same model and reference log-probs.

TRL 1.x computes the loss inside `DPOTrainer._compute_loss(model, inputs, return_outputs)`: it runs the policy
through its fused LM head and reads precomputed reference log-probs from the inputs. We call that method on a
minimal stand-in for the trainer (the attributes it reads) with a real tiny Llama policy, and compare.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from mateconv.config import ConfigError, DPOConfig  # noqa: E402
from mateconv.train.dpo import DPOObjective, concat_pair  # noqa: E402

VOCAB, SEQ, PAIRS = 50, 24, 6


def make_batch(random_dpo_pairs, seed: int) -> dict[str, torch.Tensor]:
    return default_collate(random_dpo_pairs(PAIRS, SEQ, VOCAB, seed=seed))


def trl_loss_and_metrics(policy, batch, ref_chosen, ref_rejected, settings: DPOConfig, trl_loss_type: str,
                         sft_weight: float = 0.0):
    """Run TRL's own loss code on the batch laid out as TRL's collator does: [chosen; rejected]; `sft_weight` adds
    TRL's "sft" loss (NLL on the chosen completions) with that weight."""
    loss_types, loss_weights = ([trl_loss_type, "sft"], [1.0, sft_weight]) if sft_weight else ([trl_loss_type], [1.0])
    trainer = SimpleNamespace(
        model=policy, accelerator=Accelerator(cpu=True), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights,
        beta=settings.beta, label_smoothing=settings.label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        "attention_mask": torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
        "completion_mask": torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).ne(-100).long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss, {key: values[-1] for key, values in trainer._metrics["eval"].items()}


@pytest.fixture(scope="module")
def models(tiny_llama):
    policy = tiny_llama(1, VOCAB)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return policy, tiny_llama(2, VOCAB)


def reference_sums(reference, batch):
    """Our own reference log-probs, handed to TRL as its precomputed reference."""
    ids, labels, _ = concat_pair(batch)
    objective = DPOObjective(DPOConfig(), reference=reference)
    return objective.reference_token_logps(reference, ids, labels).sum(-1).split(PAIRS)


CASES = [
    (DPOConfig(beta=0.1, loss_type="sigmoid"), "sigmoid"),
    (DPOConfig(beta=0.2, loss_type="sigmoid"), "sigmoid"),
    (DPOConfig(beta=0.1, loss_type="ipo"), "ipo"),
    (DPOConfig(beta=0.5, loss_type="ipo"), "ipo"),
    (DPOConfig(beta=0.1, loss_type="hinge"), "hinge"),
    (DPOConfig(beta=3.0, loss_type="hinge"), "hinge"),
]


@pytest.mark.parametrize("settings,trl_loss_type", CASES, ids=lambda c: getattr(c, "loss_type", c))
def test_loss_and_rewards_match_trl(models, random_dpo_pairs, settings, trl_loss_type):
    policy, reference = models
    batch = make_batch(random_dpo_pairs, seed=int(settings.beta * 10))
    ref_chosen, ref_rejected = reference_sums(reference, batch)
    with torch.no_grad():
        ours, metrics = DPOObjective(settings, reference=reference).loss(policy, batch)
        metrics = {key: float(value) for key, value in metrics.items()}
        theirs, trl_metrics = trl_loss_and_metrics(policy, batch, ref_chosen, ref_rejected, settings, trl_loss_type)
    assert ours.item() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-5), key
    # a batch where the pairs disagree, so accuracy is informative rather than trivially 0 or 1
    assert 0.0 < metrics["rewards/accuracies"] < 1.0


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_conservative_dpo_matches_trl(models, random_dpo_pairs, label_smoothing):
    """Label smoothing: -(1-e) logsig(b d) - e logsig(-b d). TRL 1.16 applies exactly this formula in its `aot`
    loss, after sorting across the batch; with one pair per call the sort is the identity, so compare pair by pair."""
    policy, reference = models
    settings = DPOConfig(beta=0.1, label_smoothing=label_smoothing)
    batch = make_batch(random_dpo_pairs, seed=7)
    ref_chosen, ref_rejected = reference_sums(reference, batch)
    with torch.no_grad():
        ours, metrics = DPOObjective(settings, reference=reference).loss(policy, batch)
        metrics = {key: float(value) for key, value in metrics.items()}
        plain, _ = DPOObjective(DPOConfig(beta=0.1), reference=reference).loss(policy, batch)
        per_pair = []
        for i in range(PAIRS):
            one = {key: value[i : i + 1] for key, value in batch.items()}
            loss, _ = trl_loss_and_metrics(policy, one, ref_chosen[i : i + 1], ref_rejected[i : i + 1], settings, "aot")
            per_pair.append(loss)
    torch.testing.assert_close(ours, torch.stack(per_pair).mean(), rtol=1e-5, atol=1e-6)
    assert abs(ours.item() - plain.item()) > 1e-4  # smoothing changes the loss


@pytest.mark.parametrize("sft_coef", [0.5, 1.0])
def test_sft_term_matches_trl_sft_loss(models, random_dpo_pairs, sft_coef):
    """--dpo_sft_coef c == TRL's loss_type ["sigmoid", "sft"] with weights [1, c] (the RPO recipe)."""
    policy, reference = models
    batch = make_batch(random_dpo_pairs, seed=11)
    ref_chosen, ref_rejected = reference_sums(reference, batch)
    settings = DPOConfig(beta=0.1, sft_coef=sft_coef)
    with torch.no_grad():
        ours, metrics = DPOObjective(settings, reference=reference).loss(policy, batch)
        metrics = {key: float(value) for key, value in metrics.items()}
        plain, _ = DPOObjective(DPOConfig(beta=0.1), reference=reference).loss(policy, batch)
        theirs, _ = trl_loss_and_metrics(policy, batch, ref_chosen, ref_rejected, settings, "sigmoid", sft_coef)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.item() == pytest.approx(plain.item() + sft_coef * metrics["nll/chosen"], rel=1e-5)


def test_bad_settings_are_rejected():
    with pytest.raises(ConfigError, match="loss_type"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(beta=0)
