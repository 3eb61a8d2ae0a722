"""The stage recipe: pretraining, SFT and DPO (and CPT, see mateconv.cpt) are data, run by one `run()`.

A Recipe names the stage's reader (its data), objective (what it minimises), evaluators (what else it measures) and
defaults. `train(stage, ...)` runs the stage a command line asks for (mateconv.train.command, the command line of
4.pretrain.py, 5.full_sft.py and 9.train_dpo.py, which reads it before this module is imported).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mateconv.config import ConfigError, TrainConfig, per_rank_sizes
from mateconv.data import DataError
from mateconv.files import LockHeld, OutputDirError, dirs_to_make, locked, remove_empty_dirs, writable_dir
from mateconv.hub import local_model_dir
from mateconv.data.readers import SUFFIXES
from mateconv.data.shards import DPOTokens, PretrainTokens, SFTTokens, other_vocabulary, shard_info
from mateconv.data.tokenizing import build_shards
from mateconv.memory import out_of_memory_figures
from mateconv.train.checkpoint import pointed_checkpoint
from mateconv.train.command import STAGE_DEFAULTS, exit_with
from mateconv.train.curves import TRAINING_PNG, plot_training
from mateconv.train.data import StageData
from mateconv.train.distributed import Runtime, barrier, every_gpu_command, setup, shutdown
from mateconv.train.dpo import DPOObjective
from mateconv.train.engine import Trainer, seed_everything
from mateconv.train.evaluators import Evaluator, forgetting_evaluator, plot_forgetting, preference_evaluator
from mateconv.train.models import (build_model, check_grouped_experts, check_vocab, extend_length, learned_positions,
                                   load_tokenizer, resolve_init_from, unused_settings, with_chatml)
from mateconv.train.objectives import LMObjective, Objective
from mateconv.train.reference import load_reference, reference_path, reference_weights, with_cached_reference
from mateconv.train.signals import STOP_FILE, StopRequest, TrainingHalted


@dataclass(frozen=True)
class Recipe:
    """A training stage as data. `reader(config, runtime, tokenizer)` loads its data, `objective(config, runtime,
    data)` builds what it minimises, and each of `evaluators` (mateconv.train.evaluators) adds metrics to every
    evaluation."""
    name: str
    reader: Callable[[TrainConfig, Runtime, object], StageData]
    objective: Callable[[TrainConfig, Runtime, StageData], Objective]
    evaluators: tuple[Callable[..., Evaluator | None], ...] = ()
    defaults: dict = field(default_factory=dict)  # flat keys; YAML files and flags override them
    validate: bool = True  # the engine's validation loss on data.val; False when an evaluator scores data.val
    evaluate_at_start: bool = False  # a fresh run logs an evaluation of the starting model as step 0
    adds_chatml: bool = False  # writes ChatML: a starting model without its tokens gets them first (`with_chatml`)
    after: Callable[[Path], None] | None = None  # rank 0, after a finished run that evaluated: given out_dir


def tokenizer_dir(config: TrainConfig) -> Path:
    """The directory whose tokenizer.json tokenizes raw data: the starting model's (a hub model's in the cache),
    else tokenizer_path."""
    init_from = config.checkpoint.init_from
    for path in (local_model_dir(init_from) if init_from else None, config.data.tokenizer_path):
        if path and (Path(path) / "tokenizer.json").is_file():
            return Path(path)
    raise DataError(f"no tokenizer.json in init_from ({config.checkpoint.init_from or 'unset'}) or tokenizer_path "
                    f"({config.data.tokenizer_path}) to tokenize the raw data with")


def tokenize_raw(kind: str, path: Path, split: str, config: TrainConfig, runtime: Runtime,
                 held_out: float = 0.0) -> Path:
    """A raw data file (jsonl, json, txt, parquet; for DPO the TRL/MiniMind chosen-rejected records of stage 7) as
    token shards in `<out_dir>/data_tokens/<split>`: rank 0 tokenizes (bad records are skipped and reported with their
    file:line), reused while the file and tokenizer are unchanged. held_out > 0: only the file's records of `split`
    in a stable hash split holding out that share for validation."""
    tokenizer, out = tokenizer_dir(config), Path(config.checkpoint.out_dir) / "data_tokens" / split
    if runtime.is_main:
        result = build_shards(kind, [path], tokenizer, out, workers=max(1, config.data.num_workers), progress=False,
                              hold_out=(split, held_out) if held_out else None)
        info = shard_info(out)
        part = f" ({split}, val_size {held_out:g})" if held_out else ""
        print(f"[{kind}] {path}{part}: {info['num_records']:,} records, {info['num_tokens']:,} tokens in {out}"
              + (" (reused)" if result.skipped_shards == info["num_shards"] else ""), flush=True)
        for where in result.index["bad_examples"][:5]:
            print(f"[{kind}] skipped {where}", flush=True)
        if result.index["bad_records"] > 5:
            print(f"[{kind}] ... {result.index['bad_records']} bad records in all", flush=True)
    barrier()
    return out


def read_shards(reader_class: type, label: str, config: TrainConfig, runtime: Runtime, tokenizer,
                **reader_options) -> StageData:
    """Token shards at data_path and (unless "") val_data_path, with the vocabulary they were tokenised with. Either
    may be a raw data file instead (`tokenize_raw`); with a raw data_path, a val_data_path of shards that do not exist
    (the stage's default) turns validation off unless val_size holds out part of the file, a raw file that does not
    exist is an error."""
    train_path, val_path = Path(config.data.data_path), config.data.val_data_path
    for path in (train_path, val_path):
        if str(path).lower().endswith(SUFFIXES) and not Path(path).is_file():
            from mateconv.prefs.pipeline import PrefsConfig  # here: stage 7's client libraries load in a second
            from mateconv.prefs.store import PAIRS

            made = Path(PrefsConfig.output_dir) / PAIRS  # seed 004 runs stage 7, then names its own pairs file
            hint = f" (stage 7 wrote its pairs to {made})" if label == "DPO" and made.is_file() else ""
            raise DataError(f"{label} data file not found: {path}{hint}")
    raw, held_out = train_path.is_file(), config.data.val_size
    if held_out and not raw:
        raise DataError(f"val_size holds out records of a raw data file; data_path {train_path} is token shards "
                        "(their validation data is val_data_path)")
    if held_out and val_path and Path(val_path).is_file():
        raise DataError(f"val_size holds out part of {train_path} for validation, and val_data_path names "
                        f"{val_path}: give one of them")
    if raw:
        train_path = tokenize_raw(reader_class.kind, Path(config.data.data_path), "train", config, runtime, held_out)
    if held_out:
        val_path = str(tokenize_raw(reader_class.kind, Path(config.data.data_path), "val", config, runtime, held_out))
        if not shard_info(val_path)["num_records"]:
            raise DataError(f"val_size {held_out:g} held out no record of {config.data.data_path}: raise it, or name "
                            "a --val_data_path FILE")
    elif val_path and Path(val_path).is_file():
        val_path = str(tokenize_raw(reader_class.kind, Path(val_path), "val", config, runtime))
    elif val_path and raw and not (Path(val_path) / "index.json").is_file():
        if runtime.is_main:
            print(f"[{reader_class.kind}] no validation data ({val_path} not found; --val_size 0.05 holds out 5% of "
                  "the file, --val_data_path FILE names another; either adds val_loss and the best/ model)", flush=True)
        val_path = ""
    elif val_path and raw and runtime.is_main:  # shards of other data beside the user's file: say whose
        sources = ", ".join(shard_info(val_path).get("inputs") or ["unrecorded files"])
        print(f"[{reader_class.kind}] validation: {val_path} (tokenized from {sources}, not from "
              f"{config.data.data_path}; --val_data_path FILE names yours, '' turns validation off)", flush=True)
    for flag, path in [("data_path", train_path)] + ([("val_data_path", val_path)] if val_path else []):
        if not (Path(path) / "index.json").is_file():
            raise DataError(f"{label} token shards not found: {path} (run 3.dataset.py, or set data_path/"
                            "val_data_path to shards or a raw data file; val_data_path '' disables validation)")
        if tokenizer is not None and (why := other_vocabulary(Path(path), tokenizer, reader_class.kind)):
            made_by = tokenizer.name_or_path  # the tokenizer the trained model is saved with
            raise DataError(f"{why}: tokenize it with {made_by}'s tokenizer (3.dataset.py --tokenizer {made_by}), "
                            f"or give {flag} a raw data file, which is tokenized with it")
    info = shard_info(train_path)
    if not info["num_records"]:  # an empty file or shards of one: nothing to train on
        kept = f" outside the val_size {held_out:g} held out for validation" if held_out else ""
        raise DataError(f"{label} training data holds no records{kept}: {config.data.data_path}")
    val = reader_class(val_path, config.model.max_seq_len, **reader_options) if val_path else None
    if val is not None and not len(val) and runtime.is_main:  # without_empty_validation turns validation off
        why = ("holds no records" if not shard_info(val_path)["num_records"]
               else f"gives no row at max_seq_len {config.model.max_seq_len}")
        print(f"[{reader_class.kind}] no validation (nor best/ model): {val_path} {why}", flush=True)
    return StageData(reader_class(train_path, config.model.max_seq_len, **reader_options), val, info["vocab_size"])


def without_empty_validation(data: StageData) -> StageData:
    """No validation (nor best/ model) rather than a NaN loss, or a crash, on held-out data without a record."""
    return StageData(data.train, None, data.vocab_size) if data.val is not None and not len(data.val) else data


def read_documents(config: TrainConfig, runtime: Runtime, tokenizer) -> StageData:
    """Pretraining rows; a small corpus may have put no document in the validation split."""
    return without_empty_validation(read_shards(PretrainTokens, "pretraining", config, runtime, tokenizer))


def read_conversations(config: TrainConfig, runtime: Runtime, tokenizer) -> StageData:
    """SFT rows, packed with `data.packing` (which says how full the rows are)."""
    data = read_shards(SFTTokens, "SFT", config, runtime, tokenizer, packing=config.data.packing)
    for split, conversations in (("training", data.train), ("validation", data.val)):
        if conversations is not None and conversations.untrained:
            if split == "training" and not conversations.num_records:
                raise DataError(f"none of the {conversations.untrained:,} SFT {split} conversations has an assistant "
                                f"token in its first max_seq_len {data.train.seq_len} tokens (the prompts are longer): "
                                "raise max_seq_len, or shorten the system prompts")
            if runtime.is_main:
                print(f"[sft] {conversations.untrained:,} of {conversations.untrained + conversations.num_records:,} "
                      f"{split} conversations skipped: no assistant token in their first max_seq_len "
                      f"{data.train.seq_len} tokens (a longer prompt), they would train nothing; raise max_seq_len "
                      "to keep them", flush=True)
    data = without_empty_validation(data)
    if config.data.packing and runtime.is_main:
        rows, conversations = len(data.train), data.train.num_records
        real = data.train.num_real_tokens / (rows * data.train.seq_len)
        print(f"[sft] packing: {conversations:,} conversations in {rows:,} rows ({conversations / rows:.2f} per row, "
              f"{real:.0%} of the positions real tokens)", flush=True)
    return data


def read_preference_pairs(config: TrainConfig, runtime: Runtime, tokenizer) -> StageData:
    """DPO pairs; with precompute_ref each carries its reference log-probs (cached next to the data)."""
    ref_path = reference_path(config)
    data = read_shards(DPOTokens, "DPO", config, runtime, tokenizer)
    train, seq_len = data.train, data.train.seq_len
    if not len(train):
        raise DataError(f"all {train.same:,} DPO training pairs have the same chosen and rejected tokens within "
                        f"max_seq_len {seq_len} (they differ only further on): raise max_seq_len")
    if runtime.is_main and train.cut:
        lost = (f"; {train.same:,} of them keep the same chosen and rejected tokens, no preference to learn: left out"
                if train.same else "")
        print(f"[dpo] note: {train.cut:,} of {len(train) + train.same:,} training pairs are longer than max_seq_len "
              f"{seq_len}: the prompt is cut from its start (to half a row at least), then the responses at the row's "
              f"end{lost}; raise max_seq_len to keep them whole", flush=True)
    if runtime.is_main and data.val is not None and data.val.same:
        print(f"[dpo] note: {data.val.same:,} of {len(data.val) + data.val.same:,} validation pairs keep the same "
              f"chosen and rejected tokens within max_seq_len {seq_len}: left out", flush=True)
    data = without_empty_validation(data)
    if not config.dpo.precompute_ref:
        return data
    train, val = with_cached_reference([data.train, data.val], ref_path, runtime, config, data.vocab_size)
    return StageData(train, val, data.vocab_size)


def lm_objective(config: TrainConfig, runtime: Runtime, data: StageData) -> LMObjective:
    return LMObjective()


def start_name(model: str | Path, weights: str) -> str:
    """A starting model as the log names it: its directory, and the file of weights loaded into it (init_weights)."""
    return f"{model} + {weights}" if weights else str(model)


def dpo_objective(config: TrainConfig, runtime: Runtime, data: StageData) -> DPOObjective:
    """The reference is the precomputed log-probs in the data, LoRA's own base model (adapters disabled) unless
    ref_model_path names another, or a frozen copy of the reference model."""
    ref_path = reference_path(config)
    ref_name = start_name(ref_path, reference_weights(config))
    reference = None
    if config.dpo.precompute_ref:
        source = f"log-probs of {ref_name}, precomputed"
    elif config.dpo.ref_model_path or not config.lora.enabled:
        reference = load_reference(ref_path, runtime, config, data.vocab_size)
        source = ref_name
    else:
        source = f"{ref_name} (LoRA: adapters disabled)"
    if runtime.is_main:
        policy = start_name(config.checkpoint.init_from, config.checkpoint.init_weights)
        print(f"[dpo] policy {policy}, reference {source}, {config.dpo}", flush=True)
    return DPOObjective(config.dpo, reference)


def report_forgetting(out_dir: Path) -> None:
    print(f"[dpo] forgetting plot: {plot_forgetting(out_dir / 'metrics.jsonl', out_dir / 'forgetting.png')}")


RECIPES = {
    "pretrain": Recipe("pretrain", read_documents, lm_objective, defaults=STAGE_DEFAULTS["pretrain"]),
    "sft": Recipe("sft", read_conversations, lm_objective, defaults=STAGE_DEFAULTS["sft"], adds_chatml=True),
    "dpo": Recipe("dpo", read_preference_pairs, dpo_objective, (preference_evaluator, forgetting_evaluator),
                  defaults=STAGE_DEFAULTS["dpo"], validate=False, evaluate_at_start=True, after=report_forgetting),
}


def fit_length(model: nn.Module, config: TrainConfig, stage: str, is_main: bool) -> None:
    """Rows are cut to max_seq_len; a starting model (RoPE) trained on shorter ones is extended to it (seed 000's
    DPO at 3000 tokens after pretraining at 512), with a note."""
    max_seq_len = config.model.max_seq_len
    table = learned_positions(model)
    if table is not None and max_seq_len > table:
        raise ConfigError(f"{config.checkpoint.init_from} has learned position embeddings for {table} tokens, fewer "
                          f"than max_seq_len {max_seq_len} (max_length in CPTConfig); set it to at most {table}")
    limit = extend_length(model, max_seq_len)
    if limit is not None and is_main:
        print(f"[{stage}] note: {config.checkpoint.init_from} was trained on rows of up to {limit} tokens; max_seq_len "
              f"{max_seq_len} extends its positions (RoPE) for this run and the model it saves", flush=True)


def check_packing(model: nn.Module, dataset) -> None:
    """Packed SFT rows are exact only for a model that keeps each conversation to itself."""
    if getattr(dataset, "packing", False) and not getattr(model.config, "document_mask", False):
        raise ConfigError(f"packing needs a model with document_mask (MateConv's, on by default); "
                          f"{type(model).__name__} would let packed conversations attend to each other")


def run(recipe: Recipe, config: TrainConfig) -> dict:
    """Set up the processes, build the model, read the data, build the objective and evaluators, and train. A stop
    (`kill -2`, the stop file) is heard from the start: one during the setup (tokenizing, DeepSpeed's first build)
    ends the run before its first step."""
    out_dir = Path(config.checkpoint.out_dir)
    with StopRequest(out_dir) as stop, claimed(out_dir, main=int(os.environ.get("RANK", "0")) == 0):
        return set_up_and_train(recipe, config, stop)


RUN_LOCK = ".run.lock"  # in out_dir, locked by rank 0 while a run writes there


@contextlib.contextmanager
def claimed(out_dir: Path, main: bool) -> Iterator[None]:
    """Rank 0 makes the output directory and holds its lock (RUN_LOCK) for the run: a second run on the directory
    (the same command started twice) resumed from the first's checkpoints and wrote its own between them."""
    if not main:
        yield
        return
    created = dirs_to_make(out_dir)
    try:
        writable_dir(out_dir, "out_dir")
    except OutputDirError as e:
        raise ConfigError(str(e)) from None
    try:
        lock = locked(out_dir / RUN_LOCK)
    except LockHeld as e:
        raise ConfigError(f"{out_dir} is in use by another run (pid {e.pid}): stop it first (`touch "
                          f"{out_dir / STOP_FILE}`) or give this run its own --out_dir") from None
    try:
        with lock:
            yield
    except BaseException:
        if created and [path.name for path in out_dir.iterdir()] == [RUN_LOCK]:  # refused before it wrote anything
            (out_dir / RUN_LOCK).unlink(missing_ok=True)
            remove_empty_dirs(created)
        raise


def set_up_and_train(recipe: Recipe, config: TrainConfig, stop: StopRequest) -> dict:
    runtime = setup(config.parallel)
    per_rank_sizes(config, runtime.world_size)
    if runtime.is_main and runtime.device.type == "cpu" and runtime.dtype != torch.float32:
        print(f"[{recipe.name}] note: dtype {config.parallel.dtype} on a CPU trains many times slower than float32 on "
              "most CPUs (they have no fast half-precision matmul); dtype auto picks float32 there", flush=True)
    resolve_init_from(config, runtime)
    for note in unused_settings(config) if runtime.is_main else []:
        print(f"[{recipe.name}] note: {note}", flush=True)
    if recipe.adds_chatml:
        with_chatml(config, runtime, recipe.name)
    seed_everything(config.optim.seed)  # identical initial weights on every rank
    model = build_model(config)
    check_grouped_experts(model, config, runtime)
    tokenizer = load_tokenizer(config)
    data = recipe.reader(config, runtime, tokenizer)
    if data.vocab_size is not None:
        check_vocab(model, data.vocab_size)
    fit_length(model, config, recipe.name, runtime.is_main)
    check_packing(model, data.train)
    objective = recipe.objective(config, runtime, data)
    evaluators = [e for e in (make(config, runtime, data, objective) for make in recipe.evaluators) if e is not None]
    if runtime.is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        engine = (f"DeepSpeed ZeRO-{config.parallel.zero_stage}" if runtime.use_deepspeed
                  else "PyTorch FSDP" if runtime.fsdp else "PyTorch")
        print(f"[{recipe.name}] {type(model).__name__}: {trainable / 1e6:.2f}M trainable parameters, {engine}, "
              f"{runtime.world_size} rank(s), {runtime.device}, {str(runtime.dtype).removeprefix('torch.')}, "
              f"{len(data.train)} training examples -> {config.checkpoint.out_dir}", flush=True)
    at_start = recipe.evaluate_at_start if config.track.eval_at_start is None else config.track.eval_at_start
    summary = Trainer(config, runtime, model, objective, data.train, data.val if recipe.validate else None,
                      tokenizer, evaluators, at_start, stop, recipe.name).fit()
    out_dir = Path(config.checkpoint.out_dir)
    if runtime.is_main and (curves := plot_training(out_dir / "metrics.jsonl", out_dir / TRAINING_PNG,
                                                    f"{recipe.name}: {out_dir}")):
        print(f"[{recipe.name}] training curves: {curves}", flush=True)
    if recipe.after is not None and evaluators and runtime.is_main and not summary["stopped"]:
        recipe.after(out_dir)
    return summary


def out_of_memory(config: TrainConfig, error: Exception) -> str:
    """The line for a run that ran out of GPU memory: torch's figures, the settings that set the memory, what to
    change, and the checkpoint the same command resumes from (the engine waited for any save still being written)."""
    latest = pointed_checkpoint(config.checkpoint.out_dir, "latest")
    kept = (f"checkpoint {latest.name} is kept: the same command resumes from it" if latest
            else "no checkpoint was written yet")
    optim, parallel = config.optim, config.parallel
    return (f"out of GPU memory ({out_of_memory_figures(error)}) with batch_size {optim.batch_size}, "
            f"max_seq_len {config.model.max_seq_len}, gradient_checkpointing "
            f"{str(parallel.gradient_checkpointing).lower()}, zero_stage {parallel.zero_stage}: lower --batch_size and "
            "raise --accumulation_steps by the same factor (the same tokens per step), or set --gradient_checkpointing "
            f"true; configs/memory/gpu{{16,24,40,80}}gb.yaml hold settings that fit those cards; {kept}")


def train(stage: str, config: TrainConfig, argv: list[str], label: str) -> int:
    """Stage `stage` of a program's command line (mateconv.train.command.main), with `config` read from `argv`;
    `label` names the stage and the rank in an error's line."""
    try:
        if (command := every_gpu_command(config.parallel, sys.argv[0], argv)) is not None:
            print(f"[{stage}] engine fsdp with several GPUs visible: one rank on each (CUDA_VISIBLE_DEVICES picks "
                  f"fewer): python {' '.join(command[1:])}", flush=True)
            os.execv(command[0], command)
        summary = run(RECIPES[stage], config)
    except (ConfigError, DataError) as e:  # each rank says its own (a launcher may stop rank 0 before it speaks)
        exit_with(f"{label}: {e}")
    except torch.OutOfMemoryError as e:  # this rank alone: the launcher stops the others
        exit_with(f"{label}: {out_of_memory(config, e)}")
    except TrainingHalted as e:  # every rank got here together: leave the process group cleanly, say it once
        shutdown()
        exit_with(f"{stage}: {e}" if os.environ.get("RANK", "0") == "0" else "")
    shutdown()
    if not summary["stopped"] and summary["is_main"]:
        print(f"[{stage}] done: step {summary['step']}"  # no loss when a finished run was resumed: no step ran
              + (f", loss {summary['loss']:.4f}" if math.isfinite(summary["loss"]) else "")
              + (f", val_loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""), flush=True)
    return 0
