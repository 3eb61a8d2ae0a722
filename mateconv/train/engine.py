"""The training loop shared by pretraining, SFT and DPO: DeepSpeed (ZeRO 0-3) or plain PyTorch (single process, DDP or
FSDP).

    runtime = setup(config)
    model = build_model(config)
    Trainer(config, runtime, model, LMObjective(), train_data, val_data, tokenizer).fit()

A step is one optimizer update over `accumulation_steps` micro-batches of `batch_size` per rank; an epoch's last step
takes those the epoch has left, so `epochs` is that many passes over the data. The loop takes a step's micro-batches
from the loader before the first forward, to count their items (an LM's labelled tokens; DPO's pairs and chosen-response
tokens) over all ranks: each part of a micro-batch's loss weighs by its share of them (`Trainer.shares`), so that the
step's loss and gradient are the mean over every labelled token (pair) of the step, however the rows are split into
micro-batches and ranks. Checkpoints are taken at step boundaries, so the data position (epoch, samples consumed in it
over all ranks) is exact on resume, also on another number of ranks (mateconv.train.universal converts a ZeRO
checkpoint for it).

Every engine reports the gradient norm before clipping. A step whose loss or gradient norm is NaN/inf is skipped
(no update, the learning-rate schedule stays), counted (`nonfinite_steps`) and logged; `max_nonfinite_steps` of them
in a row stop the run with a checkpoint of the model as the last good step left it (TrainingHalted). Under fp16 a
step the loss scaler skips for an overflowing gradient is the scaler's business and not counted.

No host synchronisation per step with plain PyTorch and fused AdamW (`Trainer.lags`, the default): the optimizer skips
a non-finite update on the device itself (its `found_inf`), and the host reads a step's loss, gradient norm and
whether it was applied one step later, once the next step's forward and backward are queued behind it; then the
schedule moves on, and the step is counted and logged. A halt found that way gives the next step's batches back
unstepped. Checkpoints and evaluations read their step's figures at once.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset

from mateconv.config import ConfigError, TrainConfig
from mateconv.train.checkpoint import (CheckpointManager, other_start, parameter_shapes, set_rng_state, step_name,
                                       training_setting_changes, unwrap)
from mateconv.train.data import (ResumableDistributedSampler, WeightedMeans, close_loader, first_rows, make_loader,
                                 split_means)
from mateconv.train.distributed import Runtime, all_reduce_mean, any_rank, sum_over_ranks
from mateconv.train.ds_config import build_ds_config
from mateconv.train.fsdp import shard
from mateconv.train.models import base_model, save_hf
from mateconv.train.objectives import Objective, weighed_metrics
from mateconv.train.optim import (build_optimizer, build_scheduler, group_settings, restore_group_settings,
                                  warmup_steps)
from mateconv.train.signals import StopRequest, TrainingHalted
from mateconv.train.tracking import (Progress, Tracker, expert_load_metrics, flops_per_token, gpu_utilization_metrics,
                                     memory_metrics, peak_flops, run_facts)
from mateconv.train.universal import needs_universal
from model.moe import MoEFeedForward

REPO_ROOT = Path(__file__).resolve().parents[2]
OBJECTIVE = "objective/"  # StepFigures' prefix for the objective's own metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_tokens(batch: dict[str, torch.Tensor], pad_id: int | None) -> tuple[int, int, int]:
    """(positions, real tokens, marked tokens) of a batch's input ids. The real tokens are those the row's
    `token_mask` (SFT) or `attention_mask` (DPO's `chosen_...`) marks, else all but padding (pad_id); the marked
    ones, which a MoE model's expert load counts, are those a mask marks, else every position. Counted on the host
    copy, before the batch goes to the device, so that it costs no sync."""
    positions = real = marked = 0
    for key, ids in batch.items():
        if not key.endswith("input_ids"):
            continue
        side = key[: -len("input_ids")]
        mask = batch.get(side + "token_mask", batch.get(side + "attention_mask"))
        positions += ids.numel()
        if mask is not None:
            counted = int(mask.sum())
            real, marked = real + counted, marked + counted
        else:
            real += ids.numel() if pad_id is None else int((ids != pad_id).sum())
            marked += ids.numel()
    return positions, real, marked


class StepFigures:
    """What the host reads of one optimizer step: its loss (mean over ranks), the gradient norm before clipping,
    whether the update was applied, and on log steps the objective's metrics (means over the step's micro-batches and
    ranks, each over what it is a mean of) and the MoE expert load (mean over ranks). The tensors among them travel
    together: from a GPU one non-blocking copy into pinned memory, so `read()` waits for this step's kernels only, not
    for those queued after them."""

    def __init__(self, figures: dict[str, torch.Tensor | float | bool]):
        self.on_host = {name: v for name, v in figures.items() if not isinstance(v, torch.Tensor)}  # DeepSpeed's
        tensors = {name: v.detach().float() for name, v in figures.items() if name not in self.on_host}
        self.shapes = {name: v.shape for name, v in tensors.items()}
        values = torch.cat([v.reshape(-1) for v in tensors.values()])
        self.ready = None
        if values.is_cuda:
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.values = values

    def read(self) -> dict[str, float | torch.Tensor]:
        if self.ready is not None:
            self.ready.synchronize()
        flat, offset, figures = self.values.tolist(), 0, {n: float(v) for n, v in self.on_host.items()}
        for name, shape in self.shapes.items():
            part, offset = flat[offset: offset + shape.numel()], offset + shape.numel()
            figures[name] = part[0] if len(shape) == 0 else torch.tensor(part).reshape(shape)
        return figures


@dataclass
class Window:
    """What the next logged row averages over: the tokens and MoE expert loads since the last one, from `start` to
    `end`, times taken on the host as each step's update is launched. With the host at most one step ahead of the
    device those are the device's pace; on a CPU they are exact."""

    start: float
    tokens: int = 0
    real_tokens: int = 0  # tokens that are not padding (SFT and DPO rows have some)
    loads: torch.Tensor | float = 0.0  # sum of the micro-batches' expert loads, each times its weight
    load_weight: float = 0.0
    end: float = 0.0  # set on a step's copy

    def add_tokens(self, positions: int, real: int) -> None:
        self.tokens, self.real_tokens = self.tokens + positions, self.real_tokens + real

    def add_load(self, load: torch.Tensor, weight: float) -> None:
        """weight: the share of the micro-batch's positions that the load counted (real tokens), so that the window's
        load is a mean over real tokens; exactly 1.0 without padding, which leaves pretraining's sums as they were."""
        self.loads, self.load_weight = self.loads + load.float() * weight, self.load_weight + weight

    def mean_load(self) -> torch.Tensor:
        """The expert load over every rank's real tokens: a rank whose micro-batches held more padding counts for
        less. A collective: every rank of an MoE model calls it on the same step."""
        loads = self.loads.flatten()
        summed = all_reduce_mean(torch.cat([loads, loads.new_tensor([self.load_weight])]))
        return (summed[:-1] / summed[-1]).reshape(self.loads.shape)

    def take(self, logged: "Window") -> None:
        """Drop a logged step's share, keeping what came after it; the next window starts where that one ended."""
        self.tokens, self.real_tokens = self.tokens - logged.tokens, self.real_tokens - logged.real_tokens
        self.loads, self.load_weight = self.loads - logged.loads, self.load_weight - logged.load_weight
        self.start = logged.end


@dataclass
class PendingStep:
    """A step the device runs while the host goes on; `Trainer._finish` completes it once its figures are read."""

    step: int
    epoch: int
    lr: float
    figures: StepFigures
    window: Window  # the log window as it stood at this step's end
    ended_at: float  # wall-clock time of that end (the row's time in metrics.jsonl)


class CheckedStep(torch.optim.Optimizer):
    """The torch optimizer under DeepSpeed ZeRO-0 in fp32, where DeepSpeed steps it as it is: neither measuring the
    gradient norm nor skipping a step with NaN/inf gradients, as its ZeRO and bf16/fp16 optimizers do. This does both
    and clips (DeepSpeed's own clipping is turned off, so the norm is the one before clipping), and sets the two
    attributes DeepSpeed's engine reads after a step: `_global_grad_norm`, and `overflow` (skipped: the learning-rate
    schedule is not advanced). DeepSpeed has averaged the gradients over ranks by then; the ranks still agree on the
    skip explicitly."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, device: torch.device):
        self.optimizer, self.max_norm, self.device = optimizer, max_norm, device
        self.defaults = optimizer.defaults
        self.overflow = False
        self._global_grad_norm: float | None = None

    # The wrapped optimizer's own, looked up each time: loading a checkpoint replaces its group and state objects, and
    # copies taken here would leave the scheduler setting the rates of groups that the optimizer no longer steps.
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm or float("inf")).item()
        self._global_grad_norm = norm
        self.overflow = any_rank(not math.isfinite(norm), self.device)
        if not self.overflow:
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


class Trainer:
    def __init__(self, config: TrainConfig, runtime: Runtime, model: torch.nn.Module, objective: Objective,
                 train_data: Dataset, val_data: Dataset | None = None, tokenizer=None,
                 evaluators: list[Callable[[torch.nn.Module], dict[str, float]]] | None = None,
                 evaluate_at_start: bool = False, stop: StopRequest | None = None, stage: str | None = None):
        """`evaluators` run at every evaluation on the (unwrapped) model; their metrics join val_loss.
        `stage`: the stage's name (pretrain, sft, dpo, cpt), kept in checkpoints: another stage does not resume them.
        `evaluate_at_start`: a fresh (not resumed) run logs an evaluation of the starting model as step 0.
        `stop`: the stop request the caller already listens to (stages.run: from the process's start), else one of
        the training loop's own."""
        self.stop, self.stage = stop, stage
        self.config, self.runtime, self.objective = config, runtime, objective
        self.train_data, self.val_data, self.tokenizer = train_data, val_data, tokenizer
        self.pad_id = getattr(tokenizer, "pad_token_id", None)  # padded positions are not counted as real tokens
        self.evaluators = evaluators or []
        self.evaluates = val_data is not None or bool(self.evaluators)
        self.evaluate_at_start = evaluate_at_start
        self.out_dir = Path(config.checkpoint.out_dir)
        self.checkpoints = CheckpointManager(self.out_dir, config.checkpoint.keep_checkpoint_max, runtime,
                                             parameter_shapes(model))
        self.resume_from = self.checkpoints.resume_path(config.checkpoint.resume)  # DeepSpeed's setup depends on it
        if self.resume_from is not None:
            self.checkpoints.check_stage(self.resume_from, stage)
            self.checkpoints.check_model(self.resume_from, config)
            self.checkpoints.check_engine(self.resume_from, config)
            self.checkpoints.check_optimizer(self.resume_from, config)
        self.checkpoints.set_aside_later(self.resume_from)
        optim, rows = config.optim, len(train_data)
        if math.ceil(rows / runtime.world_size) < optim.batch_size:
            short = "" if rows else f" (a corpus shorter than max_seq_len {config.model.max_seq_len} tokens makes none)"
            raise ConfigError(f"the training data has {rows} rows{short}, fewer than one batch of {optim.batch_size} "
                              f"per rank over {runtime.world_size} rank(s): lower --batch_size, or add data")
        self.sampler = ResumableDistributedSampler(train_data, runtime.rank, runtime.world_size, optim.seed)
        micro_per_epoch = self.sampler.per_rank // optim.batch_size
        steps_per_epoch = math.ceil(micro_per_epoch / optim.accumulation_steps)  # an epoch's last step may be shorter
        self.total_steps = optim.max_steps or optim.epochs * steps_per_epoch
        warmup = warmup_steps(optim, self.total_steps)
        if warmup >= self.total_steps and runtime.is_main:  # accepted, as Hugging Face's Trainer does, but told
            setting = f"warmup_ratio {optim.warmup_ratio:g}" if optim.warmup_ratio > 0 else "warmup_iters"
            print(f"[train] note: the warmup ({setting}: {warmup} steps) is not shorter than the run "
                  f"({self.total_steps} steps): the learning rate rises for the whole run, to "
                  f"{optim.learning_rate * self.total_steps / warmup:.3g} at its last step (learning_rate "
                  f"{optim.learning_rate:g}), and never decays", flush=True)
        self.flops_per_token = flops_per_token(base_model(model), config.model.max_seq_len)
        self.run_facts = run_facts(base_model(model), config, runtime.world_size)  # before ZeRO-3 partitions it
        self._setup_engine(model)

    # ------------------------------------------------------------------------------------------------ setup

    def _setup_engine(self, model: torch.nn.Module) -> None:
        config, runtime = self.config, self.runtime
        compiles = config.parallel.compiles(runtime.device)
        if compiles and not runtime.fsdp:  # FSDP compiles block by block (mateconv.train.fsdp)
            base_model(model).compile()  # in place: parameter names and checkpoints stay those of the eager model
        # An expert that gets no tokens in a step has no gradient: neither ZeRO-3 nor DDP may wait for its parameters.
        has_moe = any(isinstance(m, MoEFeedForward) for m in base_model(model).modules())
        if runtime.use_deepspeed:
            import deepspeed

            if config.lora.enabled and config.parallel.zero_stage == 3:
                raise ConfigError("LoRA with ZeRO-3 is not supported; use zero_stage 0-2 (LoRA state is small)")
            if has_moe and config.parallel.zero_stage == 3:
                deepspeed.utils.set_z3_leaf_modules(model, [MoEFeedForward])
            hidden = getattr(base_model(model).config, "hidden_size", 1024)
            ds_config = build_ds_config(config, runtime.dtype, runtime.world_size, hidden)
            if needs_universal(self.resume_from, runtime):
                ds_config["checkpoint"] = {"load_universal": True}
            optimizer = None
            if "optimizer" not in ds_config:
                optimizer = build_optimizer(model, config.optim, runtime.device)
                ds_config["zero_allow_untested_optimizer"] = True
                half = any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16"))
                if config.parallel.zero_stage == 0 and not half:
                    optimizer = CheckedStep(optimizer, ds_config.get("gradient_clipping", 0.0), runtime.device)
                    ds_config["gradient_clipping"] = 0.0
            self.loss_scaled = bool(ds_config.get("fp16", {}).get("enabled"))
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_config,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                lr_scheduler=lambda opt: build_scheduler(opt, config.optim, self.total_steps))
            self.scaler = None
            self.lags = False  # DeepSpeed's optimizers read the gradient norm on the host in their step
        else:
            model.to(runtime.device)
            if runtime.fsdp:
                model = shard(model, compile_blocks=compiles)
            self.optimizer = build_optimizer(model, config.optim, runtime.device)
            self.scheduler = build_scheduler(self.optimizer, config.optim, self.total_steps)
            if runtime.world_size > 1 and not runtime.fsdp:
                ids = [runtime.device.index] if runtime.device.type == "cuda" else None
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                                  find_unused_parameters=has_moe)
            self.engine = model
            fp16 = runtime.dtype == torch.float16 and runtime.device.type == "cuda"
            self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
            self.loss_scaled = fp16
            # fused AdamW skips a non-finite update on the device (`found_inf`); wandb.watch would log gradient
            # histograms at the next step before this one's row
            self.lags = (isinstance(self.optimizer, torch.optim.AdamW) and bool(self.optimizer.defaults.get("fused"))
                         and not fp16 and not config.track.wandb_watch)

    def autocast(self):
        if self.runtime.use_deepspeed or self.runtime.dtype == torch.float32:
            return contextlib.nullcontext()  # DeepSpeed casts the model itself
        return torch.autocast(self.runtime.device.type, dtype=self.runtime.dtype)

    # ------------------------------------------------------------------------------------------------ steps

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.runtime.device, non_blocking=True) for k, v in batch.items()}

    def shares(self, weights: list[dict[str, int]]) -> list[dict[str, float | torch.Tensor]]:
        """Each micro-batch's items of each kind (its `weights`, `objective.weights`: an LM's labelled tokens; DPO's
        pairs and chosen-response tokens) over the step's mean per micro-batch on all ranks: 1 when all hold as many
        (pretraining's full rows, DPO's pairs). With each part of a micro-batch's loss weighed by its kind's share, the
        mean over the step's micro-batches and ranks is the mean over all its items (Hugging Face Trainer's
        `num_items_in_batch` with `average_tokens_across_devices`). Over ranks one all-reduce per step, whose sums stay
        on the device."""
        kinds = list(weights[0])
        # a step without labelled tokens (the data leaves out such rows) keeps its NaN loss, not a division by zero
        totals = sum_over_ranks([max(sum(w[kind] for w in weights), 1) for kind in kinds], self.runtime.device)
        micro_batches = len(weights) * self.runtime.world_size
        return [{kind: w[kind] * micro_batches / total for kind, total in zip(kinds, totals)} for w in weights]

    def micro_step(self, batch: dict[str, torch.Tensor], boundary: bool, window: int,
                   shares: dict[str, float | torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """Forward + backward of one micro-batch of a step of `window` of them, its loss weighed by its `shares`; the
        optimizer steps on the boundary. Returns (the detached loss, metrics), left on the device: nothing here waits
        for the GPU."""
        if self.runtime.use_deepspeed:
            self.engine.set_gradient_accumulation_boundary(boundary)  # an epoch's last step may be shorter
            loss, metrics = self.objective.loss(self.engine, batch, shares)
            # DeepSpeed divides by accumulation_steps: the gradient is the mean over this step's micro-batches
            self.engine.backward(loss * (self.config.optim.accumulation_steps / window))
            self.engine.step()
            return loss.detach(), metrics
        if self.runtime.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
            self.engine.set_requires_gradient_sync(boundary)
        sync = boundary or not isinstance(self.engine, torch.nn.parallel.DistributedDataParallel)
        with (contextlib.nullcontext() if sync else self.engine.no_sync()), self.autocast():
            loss, metrics = self.objective.loss(self.engine, batch, shares)
        scaled = loss / window
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach(), metrics

    def optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | bool]:
        """Clip and step unless the loss (the step's mean over ranks, on the device) or the gradient norm is not
        finite; DeepSpeed already stepped (or skipped) in micro_step. The gradients are averaged over ranks (DDP) and
        so is the loss, so every rank decides alike. Returns (the gradient norm before clipping, whether the update
        was applied); under `lags` both stay on the device and nothing here waits for it."""
        if self.runtime.use_deepspeed:
            norm = self.engine.get_global_grad_norm()
            return float("nan") if norm is None else float(norm), self.engine.was_step_applied()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.engine.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip or float("inf"))
        if isinstance(norm, DTensor):  # FSDP: the norm over every rank's shards
            norm = norm.full_tensor()
        finite = torch.isfinite(norm) & torch.isfinite(loss).all()
        if self.lags:
            self.optimizer.found_inf = (~finite).float().reshape(())
            self.optimizer.step()
        elif finite.item():
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, finite

    def log_figures(self, metrics: WeightedMeans) -> dict[str, torch.Tensor]:
        """A log step's own figures, on the device: the objective's metrics, each the mean over what it is a mean of
        (`weighed_metrics`: an LM's labelled tokens, DPO's pairs or chosen-response tokens) in the step's
        micro-batches on every rank, as validation weighs them, and the MoE expert load (over the steps since the last
        logged row)."""
        figures = {}
        if metrics.totals:
            sums = metrics.sums(self.runtime.device)
            figures.update(zip((OBJECTIVE + key for key in metrics.totals), sums[:, 0] / sums[:, 1]))
        if isinstance(self.window.loads, torch.Tensor):  # an MoE model, on every rank alike
            figures["expert_load"] = self.window.mean_load()
        return figures

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    # ------------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's mean loss over the first `eval_rows` validation examples, plus the evaluators' metrics.
        `val_ppl` only for objectives that report an LM loss (not for DPO's). All of it in eval mode: no dropout, and no
        MoE balance loss in an evaluation's loss."""
        self.engine.eval()
        try:
            with torch.compiler.set_stance("force_eager"):  # other shapes (generation) would only recompile
                metrics = self._validation_loss() if self.val_data is not None else {}
                for evaluator in self.evaluators:
                    metrics.update(evaluator(unwrap(self.engine)))
        finally:
            self.engine.train()
        return metrics

    def _validation_loss(self) -> dict[str, float]:
        """The ranks split the examples (`split_means`); each batch weighs what its loss is a mean of
        (the first of `objective.weights`: an LM's labelled tokens), so the mean is the same on any number of ranks and
        with any batch size."""
        def measure(batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, float]]:
            with self.autocast():
                loss, metrics = self.objective.loss(self.engine, self.to_device(batch))
            weight = next(iter(self.objective.weights(batch).values()))
            means = {"loss": (loss, weight)}
            if "lm_loss" in metrics:
                means["lm_loss"] = (metrics["lm_loss"], weight)
            return means

        data = first_rows(self.val_data, self.config.track.eval_rows(self.config.optim.batch_size))
        means = split_means(data, self.config.optim.batch_size, measure, self.runtime.device)
        if "loss" not in means:
            return {}
        metrics = {"val_loss": means["loss"]}
        if "lm_loss" in means:
            metrics["val_ppl"] = math.exp(min(means["lm_loss"], 50.0))
        return metrics

    # ------------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to `total_steps` (or until SIGINT/SIGTERM); returns the last step, losses and whether it stopped."""
        config, runtime = self.config, self.runtime
        examples = len(self.train_data)
        made_from = self.train_data_fingerprint
        state = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "best_val_loss": None, "run_id": None,
                 "nonfinite_steps": 0, "train_examples": examples, "train_data": made_from, "stage": self.stage}
        resume_from, saved_rng = self.resume_from, None
        seed_everything(config.optim.seed + runtime.rank)  # a resume restores the RNG of each rank that saved one
        if resume_from is not None:
            settings = group_settings(self.optimizer)
            loaded, saved_rng = self.checkpoints.load(resume_from, self.engine, self.optimizer, self.scheduler)
            changes = [*restore_group_settings(self.optimizer, self.scheduler, settings),
                       *training_setting_changes(resume_from, config)]
            state.update(loaded)
            if not resume_from.resolve().is_relative_to(self.out_dir.resolve()):
                state["run_id"] = None  # another run's checkpoint: this out_dir is a W&B run of its own, not that one
            if runtime.is_main:
                self.say_resumed(resume_from, state, changes)
            state["train_examples"], state["train_data"] = examples, made_from
        self.loader = make_loader(self.train_data, self.sampler, config.optim.batch_size, config.data.num_workers,
                                  pin_memory=runtime.device.type == "cuda")  # no workers yet: they start with its use
        tracker = Tracker(config, self.out_dir, runtime.is_main, state["run_id"], state["step"], self.stage)
        state["run_id"] = tracker.run_id
        exit_code = 1  # unless the loop returns: W&B shows a stage that raised (in this setup too) as failed
        try:
            tracker.add_run_facts(self.run_facts)
            tracker.watch(unwrap(self.engine))
            tracker.log_code(REPO_ROOT)
            if self.evaluate_at_start and self.evaluates and resume_from is None:
                tracker.log(0, self.evaluate())
            peak = peak_flops(runtime.device, config.track.peak_flops) if runtime.is_main else 0.0
            self.engine.train()
            if saved_rng is not None:  # last, so that nothing set up since (measuring peak FLOP/s draws) moves it
                set_rng_state(saved_rng)
            summary = self._loop(state, tracker, peak)
            exit_code = 0
            return summary
        finally:
            close_loader(self.loader)  # now, whatever ended the run (see close_loader)
            try:
                self.checkpoints.wait()  # a checkpoint still being written is finished before the run ends
            finally:
                tracker.finish(exit_code)

    @property
    def train_data_fingerprint(self) -> str | None:
        """What the training shards were made from (their inputs and tokenizer); None for data without an index."""
        return getattr(self.train_data, "index", {}).get("fingerprint")

    def say_resumed(self, path: Path, state: dict, changes: list[str]) -> None:
        """The resume line, the optimizer settings that differ from the checkpoint's run, and what the same command
        does not do by itself: train a finished run further, or notice that the data changed under the checkpoint."""
        step = state["step"]
        print(f"[train] resumed from {path} at step {step}", flush=True)
        if changes:
            print(f"[train] note: changed since the checkpoint: {', '.join(changes)}; training goes on from step "
                  f"{step} with the new values", flush=True)
        if (start := other_start(path, self.config)) is not None:
            print(f"[train] note: the checkpoint's run started from {start}, this run names --init_from "
                  f"{self.config.checkpoint.init_from or '(none)'}: the resume goes on with the checkpoint's model, "
                  "not that one (give this run its own --out_dir to train from it)", flush=True)
        before = state.get("train_examples")  # absent in checkpoints written before it was recorded
        if before is not None and before != len(self.train_data):
            print(f"[train] note: the training data now has {len(self.train_data)} examples, the checkpoint's run had "
                  f"{before}: training goes on at the saved position in the new data (--resume never starts over)",
                  flush=True)
        elif state.get("train_data") not in (None, self.train_data_fingerprint):
            print(f"[train] note: the training data was made from other or changed files (or another tokenizer) than "
                  f"the checkpoint's run's, with as many examples ({before}): training goes on at the saved position "
                  "in the new data (--resume never starts over)", flush=True)
        if step >= self.total_steps:
            print(f"[train] this run is finished (step {step} of {self.total_steps}): nothing to train; raise "
                  "--max_steps or --epochs to go on, or pass --resume never to start over", flush=True)

    def _roll_epoch(self, state: dict) -> None:
        if self.sampler.per_rank_left(state["samples_in_epoch"]) < self.config.optim.batch_size:
            state["epoch"] += 1
            state["samples_in_epoch"] = 0

    def _loop(self, state: dict, tracker: Tracker, peak: float) -> dict:
        config, runtime = self.config, self.runtime
        step, accumulation = state["step"], config.optim.accumulation_steps
        progress = Progress(self.out_dir.name, self.total_steps, step, runtime.is_main)
        self.window, self.peak = Window(time.perf_counter()), peak
        self.streak, self.last_good = 0, step  # non-finite steps in a row; the last step applied
        # per-micro-batch figures stay on the device; the host reads a step's figures once (see the module docstring)
        self.step_loss, val, stopped, halted, pending = float("nan"), {}, False, False, None
        with contextlib.nullcontext(self.stop) if self.stop else StopRequest(self.out_dir) as stop:
            if runtime.is_main:
                stop.remove_stale()
                print(stop.stop_hint(), flush=True)
            early = stopped = any_rank(stop.requested, runtime.device)  # asked during the setup: no step is taken
            while step < self.total_steps and not stopped:
                self.sampler.set_position(state["epoch"], state["samples_in_epoch"])
                batches = iter(self.loader)
                for first in batches:
                    step_start = (state["epoch"], state["samples_in_epoch"])
                    # the micro-batches of this step: an epoch ends with a step of those left (HF Trainer's way)
                    left = self.sampler.per_rank_left(state["samples_in_epoch"]) // config.optim.batch_size
                    step_batches = [first, *itertools.islice(batches, min(accumulation, left) - 1)]
                    window = len(step_batches)
                    step_lr = self.current_lr()  # the rate this step uses (DeepSpeed moves on inside the step)
                    tracker.begin_step(step + 1)
                    losses, metrics = [], WeightedMeans()
                    weights = [self.objective.weights(batch) for batch in step_batches]  # counted on the host copies
                    for micro, (batch, batch_weights, shares) in enumerate(
                            zip(step_batches, weights, self.shares(weights)), 1):
                        state["samples_in_epoch"] += config.optim.batch_size * runtime.world_size
                        positions, real, marked = batch_tokens(batch, self.pad_id)
                        self.window.add_tokens(positions, real)
                        loss, measured = self.micro_step(self.to_device(batch), micro == window, window, shares)
                        losses.append(loss)
                        metrics.add(weighed_metrics(self.objective, batch_weights, measured))
                        moe_model = base_model(self.engine)
                        load = moe_model.expert_load() if hasattr(moe_model, "expert_load") else None
                        if load is not None:
                            self.window.add_load(load, marked / positions)

                    if pending is not None:  # the previous step: the device has it done or nearly, this one queued
                        halted, pending = self._finish(pending, state, tracker, progress), None
                        step_lr = self.current_lr()  # its schedule step is this one's rate
                    epoch_checkpoint = False
                    if halted:  # found one step late: this step's batches go back unstepped, for the resume
                        self.optimizer.zero_grad(set_to_none=True)
                        state["epoch"], state["samples_in_epoch"] = step_start
                    else:
                        # the mean over ranks (of micro-batch losses weighed by their shares): the mean over the
                        # step's items; not finite on every rank when it is on one
                        step_loss = all_reduce_mean(torch.stack(losses).float().mean())
                        grad_norm, applied = self.optimizer_step(step_loss)
                        step += 1
                        state["step"] = step
                        epoch = state["epoch"]
                        self._roll_epoch(state)
                        epoch_checkpoint = config.checkpoint.save_every_epoch and state["epoch"] != epoch
                        figures = {"loss": step_loss, "grad_norm": grad_norm, "applied": applied}
                        if self.logs_at(step):
                            figures.update(self.log_figures(metrics))
                        pending = PendingStep(step, state["epoch"], step_lr, StepFigures(figures),
                                              replace(self.window, end=time.perf_counter()), time.time())

                    stop_requested = any_rank(stop.requested, runtime.device)
                    self.checkpoints.raise_failure()  # a background save that failed halts the run here
                    due = (step % config.checkpoint.save_interval_steps == 0 or step == self.total_steps
                           or epoch_checkpoint or (self.evaluates and step % config.track.eval_interval == 0))
                    if pending is not None and (not self.lags or due or stop_requested):
                        halted, pending = self._finish(pending, state, tracker, progress), None
                    stopped = stop_requested or halted
                    save_now = (step % config.checkpoint.save_interval_steps == 0 or stopped
                                or step == self.total_steps or epoch_checkpoint)
                    paused = time.perf_counter()
                    if self.evaluates and (step % config.track.eval_interval == 0 or save_now):
                        val = self.evaluate()
                        tracker.log(step, val)
                        progress.log_eval(step, val)
                    if save_now:
                        self._save(step, state, val.get("val_loss"), tracker)
                    self.window.start += time.perf_counter() - paused  # tokens/s is training's, not evaluation's
                    if stopped and runtime.is_main and stop.file_requested():
                        self.checkpoints.wait()  # stop.sh reads the file's removal as "the checkpoint is saved"
                        stop.stop_file.unlink(missing_ok=True)  # honoured: a resume must not stop at once
                        print(f"[train] {stop.stop_file} found: checkpoint saved, the file removed", flush=True)
                    if stopped or step >= self.total_steps:
                        break
                else:
                    self._roll_epoch(state)
        progress.close()
        self.checkpoints.wait()
        if halted:
            raise TrainingHalted(
                f"the loss or gradient was NaN/inf in {self.streak} steps in a row (steps {step - self.streak + 1}-"
                f"{step}, max_nonfinite_steps {config.optim.max_nonfinite_steps}); stopped at step {step} with "
                f"checkpoint {self.out_dir / 'checkpoints' / step_name(step)}, whose weights are those after step "
                f"{self.last_good}; lower learning_rate or check the data, then run the same command to resume")
        if not stopped:
            save_hf(self.engine, self.tokenizer, self.out_dir / "final", runtime)
            tracker.log_model_dir(self.out_dir / "final", step, final=True)
        elif early and runtime.is_main:
            if stop.file_requested():
                stop.stop_file.unlink(missing_ok=True)
            print(f"[train] stopped before its first step (asked during the setup): nothing new to save; the same "
                  f"command {'resumes at step ' + str(step) if step else 'starts the run'}", flush=True)
        elif runtime.is_main:
            print(f"[train] stopped at step {step}; checkpoint saved, run the same command to resume", flush=True)
        return {"step": step, "loss": self.step_loss, "val_loss": val.get("val_loss"),
                "best_val_loss": state["best_val_loss"], "stopped": stopped, "is_main": runtime.is_main}

    def _finish(self, pending: PendingStep, state: dict, tracker: Tracker, progress: Progress) -> bool:
        """The host's part of a step, once its figures are read: the schedule moves on if the update was applied, a
        non-finite step is counted and printed, a log step (or a non-finite one) gets its row. Returns whether
        `max_nonfinite_steps` in a row now halt the run."""
        config, runtime, step = self.config, self.runtime, pending.step
        figures = pending.figures.read()
        self.step_loss, grad_norm, applied = figures["loss"], figures["grad_norm"], figures["applied"] > 0
        if applied and not runtime.use_deepspeed:  # DeepSpeed's engine steps its own schedule
            self.scheduler.step()
        nonfinite = not math.isfinite(self.step_loss) or (not math.isfinite(grad_norm) and not self.loss_scaled)
        halted = False
        if nonfinite:
            state["nonfinite_steps"] += 1
            self.streak += 1
            halted = self.streak >= config.optim.max_nonfinite_steps
            if runtime.is_main:
                print(f"\n[train] step {step}: loss {self.step_loss:.4g}, grad_norm {grad_norm:.4g}: not finite, "
                      f"optimizer step {'applied' if applied else 'skipped'} ({self.streak} in a row, "
                      f"max_nonfinite_steps {config.optim.max_nonfinite_steps})", flush=True)
        elif applied:
            self.streak, self.last_good = 0, step
        progress.update()
        if not (nonfinite or self.logs_at(step)):
            return halted
        window = pending.window
        seconds = max(window.end - window.start, 1e-9)
        tokens_per_sec = window.tokens * runtime.world_size / seconds
        # the objective's own metrics (lm_loss, DPO rewards, ...); a non-finite step off the log steps has none
        extra = {name[len(OBJECTIVE):]: value for name, value in figures.items() if name.startswith(OBJECTIVE)}
        row = {"loss": self.step_loss, "lr": pending.lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
               "real_tokens_per_sec": window.real_tokens * runtime.world_size / seconds,
               "epoch": pending.epoch, "nonfinite_steps": state["nonfinite_steps"],
               **{k: v for k, v in extra.items() if k != "aux_loss"},
               **memory_metrics(runtime.device), **gpu_utilization_metrics(runtime.device)}
        if "lm_loss" in extra:
            row["ppl"] = math.exp(min(extra["lm_loss"], 50.0))
        if self.peak > 0:
            row["mfu"] = self.flops_per_token * tokens_per_sec / (self.peak * runtime.world_size)
        if "expert_load" in figures:
            row.update(expert_load_metrics(figures["expert_load"], extra.get("aux_loss")))
        last = nonfinite or step == self.total_steps
        if last or step % config.track.tracker_every == 0:
            tracker.log(step, row, at=pending.ended_at)
        if last or step % config.track.log_interval == 0:
            progress.log(step, row)
        self.window.take(window)
        return halted

    def logs_at(self, step: int) -> bool:
        """Whether step's figures are read and logged: the progress line's steps, the tracker's, and the last."""
        track = self.config.track
        return step % track.log_interval == 0 or step % track.tracker_every == 0 or step == self.total_steps

    def _save(self, step: int, state: dict, val_loss: float | None, tracker: Tracker) -> None:
        best = state["best_val_loss"]
        is_best = val_loss is not None and math.isfinite(val_loss) and (best is None or val_loss < best)
        if is_best:
            state["best_val_loss"] = val_loss
        self.checkpoints.save(step, self.engine, self.optimizer, self.scheduler, dict(state), self.config, is_best)
        if is_best:
            save_hf(self.engine, self.tokenizer, self.out_dir / "best", self.runtime)
        if self.config.track.tracker == "wandb" and self.config.track.wandb_log_model == "checkpoint":
            self._log_checkpoint_model(step, tracker)

    def _log_checkpoint_model(self, step: int, tracker: Tracker) -> None:
        """`wandb_log_model checkpoint`: the model as this checkpoint holds it, in Hugging Face format, as a version
        of the run's model artifact: exported after the checkpoint is saved (every rank: collective under ZeRO-3 and
        FSDP), copied by W&B into its staging area on rank 0, then deleted here."""
        staging = self.out_dir / ".wandb_model"
        save_hf(self.engine, self.tokenizer, staging, self.runtime)
        if self.runtime.is_main:
            tracker.log_model_dir(staging, step, final=False)
            shutil.rmtree(staging, ignore_errors=True)
