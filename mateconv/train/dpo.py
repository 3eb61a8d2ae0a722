"""Direct Preference Optimization (stage 9): losses, the objective, the reference model and its cache.

Notation (all per preference pair, log-probs summed over the response tokens):
  chosen_logratio   = log pi(y_w|x) - log ref(y_w|x)
  rejected_logratio = log pi(y_l|x) - log ref(y_l|x)
  delta             = chosen_logratio - rejected_logratio
  rewards           = beta * logratio (the implicit DPO rewards)
See docs/dpo.md for the formulas of every loss and extra term.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from mateconv.files import atomic_dir, read_metrics
from mateconv.logprobs import model_token_logps, perplexity, trim_right_padding

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
SIDES = ("chosen", "rejected")
EVAL_REWARD_KEYS = ("eval/rewards/accuracies", "eval/rewards/margins")


class DPOError(ValueError):
    """Bad DPO settings or inputs (shown to the user as one line)."""


@dataclass
class DPOSettings:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    kl_coef: float = 0.0
    sft_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise DPOError(f"dpo loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise DPOError(f"dpo_beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise DPOError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise DPOError("label_smoothing (conservative DPO) applies to loss_type=sigmoid only")
        if self.kl_coef < 0 or self.sft_coef < 0:
            raise DPOError(f"kl_coef and sft_coef must be >= 0, got {self.kl_coef}, {self.sft_coef}")


def preference_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    settings: DPOSettings,
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


def reward_metrics(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> dict[str, float]:
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
    }


def kl_per_token(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the k3 estimator of KL(policy || ref): exp(r) - r - 1 with r = log ref - log policy.

    Non-negative and zero only where policy and reference agree on the token; it is an unbiased estimate of the
    KL when the tokens are sampled from the policy. On offline responses it penalises token-level drift either way.
    """
    r = (ref_logps - policy_logps)[mask]
    if r.numel() == 0:
        return policy_logps.sum() * 0.0
    return (torch.exp(r) - r - 1).mean()


def concat_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack chosen on top of rejected: input_ids, attention_mask, labels [2B, T], right padding trimmed."""
    for key in (f"{side}_{field}" for side in SIDES for field in ("input_ids", "labels", "attention_mask")):
        if key not in batch:
            raise DPOError(f"DPO batch has no {key!r} (expected DPOTokens items); keys: {sorted(batch)}")
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    return trim_right_padding(ids, attention, labels, attention_mask=attention)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DeepSpeed engine or DDP wrapper."""
    return getattr(model, "module", model)


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

    def __init__(self, settings: DPOSettings, reference: torch.nn.Module | None = None):
        self.settings = settings
        self.reference = reference

    def reference_token_logps(
        self, model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return model_token_logps(self.reference, ids, attention, labels)[0]
            with adapters_disabled(model):
                return model_token_logps(model, ids, attention, labels)[0]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        if "ref_chosen_logps" not in batch and self.reference is None and not hasattr(unwrap(model), "peft_config"):
            raise DPOError("no reference: pass a reference model, use LoRA, or precompute reference log-probs")
        ids, attention, labels = concat_pair(batch)
        logps, mask, aux_loss = model_token_logps(model, ids, attention, labels)
        n_pairs = batch["chosen_input_ids"].shape[0]
        policy_chosen, policy_rejected = logps.sum(-1).split(n_pairs)
        chosen_tokens_logps, chosen_mask = logps[:n_pairs], mask[:n_pairs]
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            ref_chosen_tokens = batch["ref_chosen_token_logps"][:, : logps.shape[1]]
        else:
            ref_logps = self.reference_token_logps(model, ids, attention, labels)
            ref_chosen, ref_rejected = ref_logps.sum(-1).split(n_pairs)
            ref_chosen_tokens = ref_logps[:n_pairs]
        chosen_logratios = policy_chosen - ref_chosen.to(policy_chosen)
        rejected_logratios = policy_rejected - ref_rejected.to(policy_rejected)
        lengths = mask.sum(-1).split(n_pairs)

        pair_losses = preference_losses(chosen_logratios, rejected_logratios, s, *lengths)
        loss = pair_losses.mean()
        kl = kl_per_token(chosen_tokens_logps, ref_chosen_tokens.to(logps), chosen_mask)
        chosen_nll = -chosen_tokens_logps.sum() / chosen_mask.sum().clamp(min=1)
        if s.kl_coef:
            loss = loss + s.kl_coef * kl
        if s.sft_coef:
            loss = loss + s.sft_coef * chosen_nll
        if aux_loss is not None:
            loss = loss + aux_loss
        metrics = {
            "dpo_loss": pair_losses.mean().item(),
            **reward_metrics(chosen_logratios, rejected_logratios, s.beta),
            "logps/chosen": policy_chosen.detach().mean().item(),
            "logps/rejected": policy_rejected.detach().mean().item(),
            "kl_ref": kl.item(),
            "nll/chosen": chosen_nll.item(),
        }
        return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Reference log-probs computed once over the training set and cached next to the data (`--precompute_ref`)

REF_CACHE_VERSION = 1


def fingerprint_files(paths: list[Path], extra: str = "") -> str:
    digest = hashlib.blake2b(extra.encode(), digest_size=16)
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(data_dir: Path) -> str:
    """Hash of the shard directory's files (index and shards), ignoring caches written into it."""
    files = [p for p in Path(data_dir).iterdir() if p.is_file()]
    if not any(p.name == "index.json" for p in files):
        raise DPOError(f"{data_dir} has no index.json (not a token shard directory)")
    return fingerprint_files(files)


def model_fingerprint(model_dir: Path) -> str:
    """Hash of a saved model's weights and config (a Hugging Face model directory)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DPOError(f"reference model directory {model_dir} does not exist")
    files = [p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"} or p.name == "config.json"]
    if not files:
        raise DPOError(f"{model_dir} holds no model weights (*.safetensors, *.bin)")
    return fingerprint_files(files)


def reference_cache_dir(data_dir: Path, ref_model_dir: Path, seq_len: int, dtype: torch.dtype) -> Path:
    key = hashlib.blake2b(
        f"{REF_CACHE_VERSION}|{data_fingerprint(data_dir)}|{model_fingerprint(ref_model_dir)}|{seq_len}|{dtype}".encode(),
        digest_size=8,
    ).hexdigest()
    return Path(data_dir) / "ref_logps" / key


class ReferenceLogps:
    """A finished cache: `sums` [N, 2] (chosen, rejected) and `chosen_tokens` [N, seq_len - 1], memory-mapped."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.sums = np.load(self.directory / "sums.npy", mmap_mode="r")
        self.chosen_tokens = np.load(self.directory / "chosen_tokens.npy", mmap_mode="r")

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / "meta.json").is_file()


class WithReferenceLogps(Dataset):
    """DPO pairs plus their cached reference log-probs (the keys `DPOObjective` reads from the batch)."""

    def __init__(self, pairs: Dataset, reference: ReferenceLogps):
        if len(reference.sums) != len(pairs):
            raise DPOError(f"reference cache {reference.directory} has {len(reference.sums)} rows, data has {len(pairs)}")
        self.pairs, self.reference = pairs, reference

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.pairs[index])
        chosen, rejected = self.reference.sums[index]
        item["ref_chosen_logps"] = torch.tensor(float(chosen))
        item["ref_rejected_logps"] = torch.tensor(float(rejected))
        item["ref_chosen_token_logps"] = torch.from_numpy(np.array(self.reference.chosen_tokens[index]))
        return item


@torch.no_grad()
def compute_reference_logps(
    reference: torch.nn.Module,
    pairs: Dataset,
    directory: Path,
    batch_size: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
) -> ReferenceLogps:
    """Run the reference over every pair once (ranks split the pairs) and write the cache atomically on rank 0.

    Every rank runs the same number of forwards (the last index is repeated to even them out), which ZeRO-3
    needs because each forward gathers parameters collectively.
    """
    directory = Path(directory)
    n = len(pairs)
    mine = list(range(rank, n, world_size))
    per_rank = -(-n // world_size)
    mine += [mine[-1] if mine else 0] * (per_rank - len(mine))
    seq_len = pairs[0]["chosen_input_ids"].shape[0]
    sums = np.zeros((len(mine), 2), np.float32)
    chosen_tokens = np.zeros((len(mine), seq_len - 1), np.float32)
    reference.eval()
    for start in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", disable=rank != 0, unit="batch"):
        rows = mine[start : start + batch_size]
        batch = {k: v.to(device) for k, v in default_collate([pairs[i] for i in rows]).items()}
        ids, attention, labels = concat_pair(batch)
        logps = model_token_logps(reference, ids, attention, labels)[0].float()
        chosen, rejected = logps.split(len(rows))
        sums[start : start + len(rows), 0] = chosen.sum(-1).cpu().numpy()
        sums[start : start + len(rows), 1] = rejected.sum(-1).cpu().numpy()
        chosen_tokens[start : start + len(rows), : chosen.shape[1]] = chosen.cpu().numpy()
    parts = [(mine, sums, chosen_tokens)]
    if world_size > 1:
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, (mine, sums, chosen_tokens))
    if rank == 0:
        all_sums = np.zeros((n, 2), np.float32)
        all_tokens = np.zeros((n, seq_len - 1), np.float32)
        for indices, part_sums, part_tokens in parts:
            all_sums[indices] = part_sums
            all_tokens[indices] = part_tokens
        with atomic_dir(directory) as tmp:
            np.save(tmp / "sums.npy", all_sums)
            np.save(tmp / "chosen_tokens.npy", all_tokens)
            (tmp / "meta.json").write_text(json.dumps({"pairs": n, "seq_len": seq_len, "version": REF_CACHE_VERSION}))
    if world_size > 1:
        torch.distributed.barrier()
    return ReferenceLogps(directory)


# ---------------------------------------------------------------------------------------------------------------
# Catastrophic forgetting: perplexity on held-out pretraining and SFT data, and held-out preference metrics

@torch.no_grad()
def preference_eval(model: torch.nn.Module, objective: DPOObjective, pairs: Dataset, batch_size: int,
                    max_batches: int | None, device: torch.device | str) -> dict[str, float]:
    """The objective's metrics averaged over held-out pairs (reward accuracy, margins, KL, ...)."""
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=False)
    totals: dict[str, float] = {}
    batches = 0
    for batch in loader:
        if max_batches is not None and batches == max_batches:
            break
        loss, metrics = objective.loss(model, {k: v.to(device) for k, v in batch.items()})
        for key, value in {"loss": loss.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value
        batches += 1
    return {key: value / max(batches, 1) for key, value in totals.items()}


def forgetting_eval(model: torch.nn.Module, held_out: dict[str, Dataset], batch_size: int,
                    max_batches: int | None) -> dict[str, float]:
    """`{"forget/<name>_ppl": perplexity}` for each held-out LM data set (e.g. pretrain and sft validation shards)."""
    return {f"forget/{name}_ppl": perplexity(unwrap(model), data, batch_size, max_batches).ppl
            for name, data in held_out.items()}


def plot_forgetting(metrics_jsonl: Path, out_png: Path) -> Path:
    """Held-out perplexities (left) and held-out reward accuracy (right) against the DPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mateconv.files import save_figure

    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(metrics_jsonl):
        for key, value in record.items():
            if (key.startswith("forget/") or key in EVAL_REWARD_KEYS) and isinstance(value, (int, float)):
                series.setdefault(key, []).append((int(record["step"]), float(value)))
    if not series:
        raise DPOError(f"{metrics_jsonl} has no forgetting metrics (forget/*) to plot")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in sorted(series.items()):
        axis = left if key.startswith("forget/") else right
        steps, values = zip(*sorted(points))
        axis.plot(steps, values, marker="o", label=key.split("/", 1)[1])
    left.set(title="held-out perplexity (lower = less forgetting)", xlabel="DPO step", ylabel="perplexity")
    right.set(title="held-out preference pairs", xlabel="DPO step")
    right.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    save_figure(figure, Path(out_png))
    plt.close(figure)
    return Path(out_png)


# ---------------------------------------------------------------------------------------------------------------
# Stage 9 on the shared engine

STAGE_DEFAULTS = {"out_dir": "out/dpo", "data_path": "out/tokens/dpo/train", "val_data_path": "out/tokens/dpo/val",
                  "init_from": "out/sft/final", "learning_rate": 5e-6, "weight_decay": 0.0, "batch_size": 8,
                  "warmup_iters": 10, "eval_interval": 100, "save_interval_steps": 200, "eval_batches": 20}


def settings_from(config) -> DPOSettings:
    return DPOSettings(beta=config.dpo_beta, loss_type=config.dpo_loss_type,
                       label_smoothing=config.dpo_label_smoothing, kl_coef=config.dpo_kl_coef,
                       sft_coef=config.dpo_sft_coef)


def reference_path(config) -> Path:
    path = Path(config.ref_model_path or config.init_from)
    if not str(path) or str(path) == ".":
        raise DPOError("DPO needs a starting model: set init_from (default out/sft/final) or ref_model_path")
    if not path.is_dir():
        raise DPOError(f"reference model {path} is not a directory (a saved Hugging Face model; run stage 5 first)")
    return path


def load_reference(path: Path, runtime, config) -> torch.nn.Module:
    """The frozen reference on the training device. Under ZeRO-3 it is sharded like the policy (an inference-only
    DeepSpeed engine), otherwise each rank holds a copy, in the dtype DeepSpeed trains in."""
    from transformers import AutoModelForCausalLM

    import model as _registers_mateconv  # noqa: F401

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    if runtime.use_deepspeed and config.zero_stage == 3:
        import deepspeed

        from mateconv.train.ds_config import build_ds_config

        ds = build_ds_config(config, runtime.dtype, runtime.world_size, getattr(reference.config, "hidden_size", 1024))
        ds.pop("optimizer", None)
        ds["zero_optimization"].pop("offload_optimizer", None)
        return deepspeed.initialize(model=reference, config=ds)[0].module
    dtype = runtime.dtype if runtime.use_deepspeed else torch.float32  # plain PyTorch autocasts the forward instead
    return reference.to(runtime.device, dtype)


def held_out_lm_data(config) -> dict[str, Dataset]:
    """Pretraining/SFT validation shards for the forgetting curves, named by their stage directory."""
    from mateconv.data.shards import PretrainTokens, SFTTokens, shard_info

    readers = {"pretrain": PretrainTokens, "sft": SFTTokens}
    data = {}
    for path in map(Path, config.forget_data_paths):
        if not (path / "index.json").is_file():
            print(f"[dpo] forgetting eval: {path} not found, skipped", flush=True)
            continue
        kind = shard_info(path)["kind"]
        if kind not in readers:
            raise DPOError(f"forget_data_paths: {path} holds {kind!r} shards; pretrain or sft expected")
        data[path.parent.name if path.name in ("val", "train") else path.name] = readers[kind](path, config.max_seq_len)
    return data


def cached_reference(pairs, ref_path: Path, runtime, config, loaded: list) -> WithReferenceLogps:
    """`pairs` with their reference log-probs from the cache next to the data, computing it first if missing."""
    cache_dir = reference_cache_dir(pairs.directory, ref_path, config.max_seq_len, runtime.dtype)
    if ReferenceLogps.exists(cache_dir):
        if runtime.is_main:
            print(f"[dpo] reusing reference log-probs {cache_dir}", flush=True)
    else:
        if not loaded:
            loaded.append(load_reference(ref_path, runtime, config))
        compute_reference_logps(loaded[0], pairs, cache_dir, config.batch_size, runtime.device, runtime.rank,
                                runtime.world_size)
    return WithReferenceLogps(pairs, ReferenceLogps(cache_dir))


def run(config) -> dict:
    from mateconv.data.shards import DPOTokens, shard_info
    from mateconv.train.distributed import setup
    from mateconv.train.engine import Trainer, seed_everything
    from mateconv.train.models import build_model, load_tokenizer
    from mateconv.train.stages import check_vocab

    settings = settings_from(config)
    ref_path = reference_path(config)
    runtime = setup(config)
    for path in [config.data_path] + ([config.val_data_path] if config.val_data_path else []):
        if not (Path(path) / "index.json").is_file():
            raise DPOError(f"DPO token shards not found: {path} (run 3.dataset.py, or set data_path/val_data_path)")
    train = DPOTokens(config.data_path, config.max_seq_len)
    val = DPOTokens(config.val_data_path, config.max_seq_len) if config.val_data_path else None
    seed_everything(config.seed)
    policy = build_model(config)
    check_vocab(policy, shard_info(config.data_path)["vocab_size"])

    reference = None
    if config.precompute_ref:
        loaded: list[torch.nn.Module] = []  # the reference model, loaded only if a cache must be computed
        train, val = (None if pairs is None else cached_reference(pairs, ref_path, runtime, config, loaded)
                      for pairs in (train, val))
        loaded.clear()
    elif config.ref_model_path or not config.use_lora:  # LoRA's reference is its own base (adapters disabled)
        reference = load_reference(ref_path, runtime, config)
    objective = DPOObjective(settings, reference)

    held_out = held_out_lm_data(config)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        """Held-out pairs (their loss is the val_loss that picks the best checkpoint) and forgetting perplexities."""
        metrics = {}
        if val is not None:
            pairs = preference_eval(model, objective, val, config.batch_size, config.eval_batches or None,
                                    runtime.device)
            metrics["val_loss"] = pairs["loss"]
            metrics.update({f"eval/{key}": value for key, value in pairs.items()})
        metrics.update(forgetting_eval(model, held_out, config.batch_size, config.eval_batches or None))
        return metrics

    out_dir = Path(config.out_dir)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"[dpo] policy {config.init_from}, reference {ref_path}"
              f"{' (LoRA: adapters disabled)' if reference is None and not config.precompute_ref else ''}, "
              f"{settings}, {len(train)} pairs, precomputed reference: {config.precompute_ref}", flush=True)
    has_held_out = val is not None or bool(held_out)
    trainer = Trainer(config, runtime, policy, objective, train, None, load_tokenizer(config),
                      [evaluate] if has_held_out else [], evaluate_at_start=True)
    summary = trainer.fit()
    if has_held_out and runtime.is_main and not summary["stopped"]:
        print(f"[dpo] forgetting plot: {plot_forgetting(out_dir / 'metrics.jsonl', out_dir / 'forgetting.png')}")
    return summary


def main(argv: list[str] | None = None) -> int:
    import sys

    from mateconv.config import ConfigError, help_text, parse_config
    from mateconv.data import DataError
    from mateconv.train.distributed import shutdown

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(f"usage: 9.train_dpo.py [CONFIG.yaml] [--key value ...] [--overrides key=value ...]\n{help_text()}")
        return 0
    try:
        summary = run(parse_config(argv, STAGE_DEFAULTS))
    except (ConfigError, DataError, DPOError) as e:
        sys.exit(f"dpo: {e}")
    shutdown()
    if not summary["stopped"]:
        print(f"[dpo] done: step {summary['step']}, loss {summary['loss']:.4f}", flush=True)
    return 0
