"""Direct Preference Optimization (stage 9): the losses and the objective. The reference log-probs cache is in
`mateconv.train.reference`, the held-out evaluators in `mateconv.train.evaluators`.

Notation (all per preference pair, log-probs summed over the response tokens):
  chosen_logratio   = log pi(y_w|x) - log ref(y_w|x)
  rejected_logratio = log pi(y_l|x) - log ref(y_l|x)
  delta             = chosen_logratio - rejected_logratio
  rewards           = beta * logratio (the implicit DPO rewards)
See docs/dpo.md for the formulas of every loss and extra term.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mateconv.config import ConfigError, DPOConfig
from mateconv.logprobs import IGNORE_INDEX, model_token_logps, trim_right_padding
from mateconv.train.checkpoint import unwrap

SIDES = ("chosen", "rejected")


class DPOError(ConfigError):
    """Bad DPO inputs (shown to the user as one line)."""


def preference_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    settings: DPOConfig,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """Per-pair loss [B] from the summed log-ratios [B]; lengths (response token counts) are used by IPO only."""
    beta, eps = settings.beta, settings.label_smoothing
    if settings.loss_type == "sigmoid":
        delta = chosen_logratios - rejected_logratios
        # conservative DPO: the label is flipped with probability eps
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if settings.loss_type == "hinge":
        return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    # IPO regresses the per-token log-ratio gap onto 1/(2*beta); per-token so the target is length independent
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def reward_metrics(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                   beta: float) -> dict[str, torch.Tensor]:
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }


def kl_per_token(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the k3 estimator of KL(ref || policy): exp(r) - r - 1 with r = log policy - log ref.

    Each term is >= 0 and zero only where policy and reference agree on the token. It is unbiased for tokens sampled
    from the reference, which is what offline responses are, or approximate (stage 7 samples the SFT model; the SFT
    model imitates a data set's). The other direction's k3, ref/policy - ..., needs tokens sampled from the policy:
    on offline tokens one the policy has dropped (ref 0.97, policy 1e-4) alone adds ~9000 and swamps the mean.
    """
    r = (policy_logps - ref_logps).masked_fill(~mask, 0.0)  # 0 where masked: exp(0) - 0 - 1 adds nothing
    return (torch.exp(r) - r - 1).sum() / mask.sum().clamp(min=1)


def concat_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack chosen on top of rejected: input_ids, labels, attention_mask [2B, T], the columns that are padding in
    every row trimmed (the one host sync of a DPO micro-batch: a shorter forward is worth more)."""
    for key in (f"{side}_{field}" for side in SIDES for field in ("input_ids", "labels", "attention_mask")):
        if key not in batch:
            raise DPOError(f"DPO batch has no {key!r} (expected DPOTokens items); keys: {sorted(batch)}")
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    return trim_right_padding(ids, labels, attention, attention_mask=attention)


def adapters_disabled(model: torch.nn.Module):
    """Context in which a PEFT (LoRA) model computes its base model's outputs; a no-op for plain models."""
    inner = unwrap(model)
    if hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config"):
        return inner.disable_adapter()
    return contextlib.nullcontext()


class DPOObjective:
    """`loss(model, batch) -> (loss, metrics)` for the training engine.

    The reference log-probs come from the batch (`ref_chosen_logps`, `ref_rejected_logps`, `ref_chosen_token_logps`,
    added by `WithReferenceLogps` when precomputed), else from `reference` (a frozen model), else, for LoRA, from the
    policy with its adapters disabled.
    """

    def __init__(self, settings: DPOConfig, reference: torch.nn.Module | None = None):
        self.settings = settings
        self.reference = reference

    def reference_token_logps(self, model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return model_token_logps(self.reference, ids, labels)[0]
            with adapters_disabled(model):
                return model_token_logps(model, ids, labels)[0]

    per_kind = {"kl_ref": "tokens", "nll/chosen": "tokens"}  # means over the chosen responses' labelled tokens

    def weights(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """The pairs (the preference loss is a mean over them) and the chosen responses' labelled tokens (the KL and
        NLL terms are means over those)."""
        return {"pairs": len(batch["chosen_input_ids"]),
                "tokens": int((batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum())}

    def total(self, dpo_loss: torch.Tensor | float, kl: torch.Tensor | float, chosen_nll: torch.Tensor | float,
              token_share: float | torch.Tensor = 1.0) -> torch.Tensor | float:
        """The loss without the MoE balance loss: the preference loss plus the extra terms that are switched on, these
        (means over tokens) weighed by `token_share` in a training step (see Objective.loss)."""
        s = self.settings
        loss = dpo_loss
        if s.kl_coef:
            loss = loss + s.kl_coef * kl * token_share
        if s.sft_coef:
            loss = loss + s.sft_coef * chosen_nll * token_share
        return loss

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             shares: Mapping[str, float | torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """`shares` (Objective.loss): the pairs' is 1 in training, where every micro-batch holds batch_size pairs;
        the tokens' weighs the KL and NLL terms, so that a step's are means over all its chosen-response tokens."""
        s = self.settings
        if "ref_chosen_logps" not in batch and self.reference is None and not hasattr(unwrap(model), "peft_config"):
            raise DPOError("no reference: pass a reference model, use LoRA, or precompute reference log-probs")
        ids, labels, real = concat_pair(batch)
        n_pairs = batch["chosen_input_ids"].shape[0]
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            ref_chosen_tokens = batch["ref_chosen_token_logps"][:, : ids.shape[1] - 1]
        else:  # before the policy's forward: a LoRA reference is the same model, whose MoE load the engine reads after
            ref_logps = self.reference_token_logps(model, ids, labels)
            ref_chosen, ref_rejected = ref_logps.sum(-1).split(n_pairs)
            ref_chosen_tokens = ref_logps[:n_pairs]
        logps, mask, aux_loss = model_token_logps(model, ids, labels, real)
        policy_chosen, policy_rejected = logps.sum(-1).split(n_pairs)
        chosen_tokens_logps, chosen_mask = logps[:n_pairs], mask[:n_pairs]
        chosen_logratios = policy_chosen - ref_chosen.to(policy_chosen)
        rejected_logratios = policy_rejected - ref_rejected.to(policy_rejected)
        lengths = mask.sum(-1).split(n_pairs)

        pair_losses = preference_losses(chosen_logratios, rejected_logratios, s, *lengths)
        kl = kl_per_token(chosen_tokens_logps, ref_chosen_tokens.to(logps), chosen_mask)
        chosen_nll = -chosen_tokens_logps.sum() / chosen_mask.sum().clamp(min=1)
        shares = shares or {}
        loss = self.total(pair_losses.mean() * shares.get("pairs", 1.0), kl, chosen_nll, shares.get("tokens", 1.0))
        aux = aux_loss if model.training else None  # the router's balance loss trains, as in pretraining and SFT
        if aux is not None:
            loss = loss + aux
        metrics = {  # on the device, detached: the engine reads them on log steps only
            "dpo_loss": pair_losses.detach().mean(),
            **reward_metrics(chosen_logratios, rejected_logratios, s.beta),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
            "kl_ref": kl.detach(),
            "nll/chosen": chosen_nll.detach(),
        }
        if aux is not None:
            metrics["aux_loss"] = aux.detach()
        return loss, metrics
