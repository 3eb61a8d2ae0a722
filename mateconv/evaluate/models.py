"""One model's evaluation (`evaluate_model`) and how models are named and paired for win rates."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mateconv.chat import context_length, load_model
from mateconv.data.shards import other_vocabulary
from mateconv.evaluate.data import EvalError, prompt_text, val_dataset
from mateconv.evaluate.metrics import TaskResult, balance_stats, greedy_replies, task_accuracy
from mateconv.lm_eval_tasks import run_lm_eval
from mateconv.logprobs import BitsPerByte, Perplexity, bits_per_byte, perplexity
from mateconv.train.models import model_dir
from mateconv.winrate import WinRate


DEFAULT_COMPARISONS = [("sft", "pretrain"), ("dpo", "sft")]  # (model, baseline) by stage, when both are evaluated
BPB_STARTS = ("auto", "eos", "bos")


def file_label(label: str) -> str:
    """A model label as part of a file name (sft/final -> sft_final)."""
    return label.replace("/", "_")


@dataclass
class ModelReport:
    label: str
    path: str
    kind: str  # "dense" or "moe"
    params_m: float
    ppl: Perplexity | None = None
    bpb: BitsPerByte | None = None
    bpb_start: str | None = None  # "bos" or "eos": the token each document followed when scored
    tasks: TaskResult | None = None
    samples: dict[str, str] = field(default_factory=dict)  # prompt -> greedy reply
    judge_replies: list[str] = field(default_factory=list)  # greedy replies to the judged held-out prompts
    win_rates: list[WinRate] = field(default_factory=list)  # this model against its baselines
    balance: dict | None = None
    lm_eval: dict[str, float] = field(default_factory=dict)  # "<task>/<metric>" from lm-evaluation-harness
    error: str | None = None  # why this model was not evaluated (the others still are)

    def row(self) -> dict:
        """One flat row for summary.csv / summary.md."""
        return {
            "model": self.label, "kind": self.kind,
            "params_M": None if math.isnan(self.params_m) else round(self.params_m, 2),
            "val_loss": None if self.ppl is None else round(self.ppl.loss, 4),
            "val_ppl": None if self.ppl is None else round(self.ppl.ppl, 3),
            "val_tokens": None if self.ppl is None else self.ppl.tokens,
            "val_bpb": None if self.bpb is None else round(self.bpb.bpb, 4),
            "task_accuracy": None if self.tasks is None else round(self.tasks.accuracy, 4),
            "tasks_n": None if self.tasks is None else self.tasks.n,
            "load_cv_mean": None if self.balance is None else round(self.balance["cv_mean"], 4),
            "load_max_min": None if self.balance is None else round(self.balance["max_min_worst"], 3),
            **{f"lm_eval:{name}": round(value, 4) for name, value in self.lm_eval.items()},
            **{f"win_rate:{w.baseline}": None if math.isnan(w.win_rate) else round(w.win_rate, 4)
               for w in self.win_rates},
            **({"error": self.error} if self.error else {}),
        }


def ships_own_code(path: Path) -> bool:
    """Whether loading the checkpoint at `path` runs code it ships: an auto_map for a model type transformers does
    not know (MiniMind's converted models; ours are registered when `model` is imported)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise EvalError(f"{path / 'config.json'}: not valid JSON ({error.msg})") from None
    return "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING


def model_labels(paths: list[Path]) -> list[str]:
    """Each checkpoint's label: its last two path parts, the stage and the checkpoint (out/sft/final -> sft/final), and
    more of the path where two would read alike or name their files alike (out/sft/final and runB/sft/final keep their
    first parts, as do x/a_b/final and y/a/b_final)."""
    resolved = [path.resolve() for path in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise EvalError(f"--models names the checkpoint {paths[index]} twice")
    depths = [2] * len(paths)
    while True:
        labels = [Path(*path.parts[-depth:]).as_posix() for path, depth in zip(paths, depths)]
        names = [file_label(label) for label in labels]
        alike = [index for index, name in enumerate(names) if names.count(name) > 1]
        if not alike:
            return labels
        if all(depths[index] >= len(paths[index].parts) for index in alike):  # alike to the first part
            first, second = [paths[index] for index in alike if names[index] == names[alike[0]]][:2]
            raise EvalError(f"--models {first} and {second} would write their results to the same files (named "
                            f"{names[alike[0]]}): give one of them another folder name")
        for index in alike:
            depths[index] += 1


def stage_of(label: str) -> str:
    """sft/final -> sft; runB/sft/final -> sft"""
    parts = label.split("/")
    return parts[-2] if len(parts) > 1 else parts[0]


def comparisons_for(labels: list[str], requested: list[str] | None) -> list[tuple[str, str]]:
    """(model, baseline) label pairs: each requested 'MODEL:BASELINE' (a label or a stage name), by default the
    DEFAULT_COMPARISONS whose both stages are among the models."""
    def find(name: str) -> str | None:
        return next((label for label in labels if name in (label, stage_of(label))), None)

    if requested is None:
        pairs = [(find(model), find(baseline)) for model, baseline in DEFAULT_COMPARISONS]
        return [(model, baseline) for model, baseline in pairs if model and baseline]
    pairs = []
    for item in requested:
        model, _, baseline = item.partition(":")
        found = (find(model), find(baseline))
        if not baseline or None in found or found[0] == found[1]:
            raise EvalError(f"--compare {item!r}: expected MODEL:BASELINE, two different model labels or stages "
                            f"among {', '.join(labels)}")
        pairs.append(found)
    return pairs


def model_kind(config) -> str:
    """"moe" or "dense": MateConv's `use_moe`, else a transformers MoE's expert count (our Qwen2-/Qwen3-MoE exports'
    `num_experts`, Mixtral's `num_local_experts`, DeepSeek's `n_routed_experts`)."""
    if hasattr(config, "use_moe"):
        return "moe" if config.use_moe else "dense"
    experts = (getattr(config, name, None) for name in ("num_experts", "num_local_experts", "n_routed_experts"))
    return "moe" if any(isinstance(count, int) and count > 1 for count in experts) else "dense"


def bpb_start_token(model, tokenizer, choice: str) -> str:
    """'bos' or 'eos': the token each document follows when scored for bits per byte. 'auto' takes the one the model
    was pretrained with: MiniMind puts BOS before each document; MateConv packs each after the previous one's EOS."""
    if choice == "auto":
        choice = "bos" if model.config.model_type == "minimind" else "eos"
    if getattr(tokenizer, f"{choice}_token_id") is None:
        raise EvalError(f"--bpb_start {choice}: the model's tokenizer has no {choice.upper()} token")
    return choice


def evaluate_model(path: Path, label: str, val: Path | None, tasks: list[dict] | None, samples: list[list[dict]],
                   seq_len: int | None, batch_size: int, max_batches: int | None, max_new_tokens: int,
                   device: str = "auto", lm_eval_tasks: list[str] | None = None, tasks_file: Path | None = None,
                   max_tasks: int | None = None, texts: list[str] | None = None,
                   judge_prompts: list[list[dict]] | None = None, trust_remote_code: bool = False,
                   bpb_start: str = "auto") -> ModelReport:
    model, tokenizer = load_model(path, device, trust_remote_code=trust_remote_code)
    report = ModelReport(label, str(path), model_kind(model.config),
                         sum(p.numel() for p in model.parameters()) / 1e6)
    mismatch = val is not None and other_vocabulary(val, tokenizer)
    if mismatch:  # e.g. MiniMind's model beside ours: its val_bpb still compares
        print(f"[evaluate] {report.label}: {mismatch}; no perplexity for it", flush=True)
    elif val is not None:
        length = min(seq_len or context_length(model), context_length(model))
        try:
            report.ppl = perplexity(model, val_dataset(val, tokenizer, length), batch_size, max_batches)
        except ValueError as error:
            raise EvalError(f"{val}: {error}") from None
        if report.ppl.expert_load is not None:
            report.balance = balance_stats(report.ppl.expert_load)
    if texts:
        report.bpb_start = bpb_start_token(model, tokenizer, bpb_start)
        report.bpb = bits_per_byte(model, tokenizer, texts,
                                   min(seq_len or context_length(model), context_length(model)), batch_size,
                                   [getattr(tokenizer, f"{report.bpb_start}_token_id")])
    if tasks:
        report.tasks = task_accuracy(model, tokenizer, tasks, max_new_tokens, batch_size)
    replies = greedy_replies(model, tokenizer, samples, max_new_tokens, batch_size, desc="samples")
    report.samples = dict(zip(map(prompt_text, samples), replies))
    if judge_prompts:
        report.judge_replies = greedy_replies(model, tokenizer, judge_prompts, max_new_tokens, batch_size,
                                              desc="judge prompts")
    if lm_eval_tasks:
        report.lm_eval = run_lm_eval(model_dir(path), lm_eval_tasks, tasks_file, max_tasks, max_new_tokens,
                                     str(model.device))
    return report
