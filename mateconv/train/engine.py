"""The training loop shared by pretraining, SFT and DPO: DeepSpeed (ZeRO 0-3) or plain PyTorch (single process/DDP).

    runtime = setup(config)
    model = build_model(config)
    Trainer(config, runtime, model, LMObjective(), train_data, val_data, tokenizer).fit()

A step is one optimizer update over `accumulation_steps` micro-batches of `batch_size` per rank. Checkpoints are
taken at step boundaries, so the data position (epoch, samples consumed in it over all ranks) is exact on resume, also
on another number of ranks (mateconv.train.universal converts a ZeRO checkpoint for it).

Every engine reports the gradient norm before clipping. A step whose loss or gradient norm is NaN/inf is skipped
(no update, the learning-rate schedule stays), counted (`nonfinite_steps`) and logged; `max_nonfinite_steps` of them
in a row stop the run with a checkpoint of the model as the last good step left it (TrainingHalted). Under fp16 a
step the loss scaler skips for an overflowing gradient is the scaler's business and not counted.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mateconv.config import ConfigError, TrainConfig
from mateconv.train.checkpoint import CheckpointManager, step_name, unwrap
from mateconv.train.data import ResumableDistributedSampler, make_loader
from mateconv.train.distributed import Runtime, all_reduce_mean, any_rank
from mateconv.train.ds_config import build_ds_config
from mateconv.train.models import base_model, save_hf
from mateconv.train.objectives import Objective
from mateconv.train.optim import build_optimizer, build_scheduler
from mateconv.train.signals import StopRequest, TrainingHalted
from mateconv.train.tracking import (Progress, Tracker, expert_load_metrics, flops_per_token, gpu_utilization_metrics,
                                     memory_metrics, peak_flops)
from mateconv.train.universal import needs_universal
from model.moe import MoEFeedForward

REPO_ROOT = Path(__file__).resolve().parents[2]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


class CheckedStep(torch.optim.Optimizer):
    """The torch optimizer under DeepSpeed ZeRO-0 in fp32, where DeepSpeed steps it as it is: neither measuring the
    gradient norm nor skipping a step with NaN/inf gradients, as its ZeRO and bf16/fp16 optimizers do. This does both
    and clips (DeepSpeed's own clipping is turned off, so the norm is the one before clipping), and sets the two
    attributes DeepSpeed's engine reads after a step: `_global_grad_norm`, and `overflow` (skipped: the learning-rate
    schedule is not advanced). DeepSpeed has averaged the gradients over ranks by then; the ranks still agree on the
    skip explicitly."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, device: torch.device):
        self.optimizer, self.max_norm, self.device = optimizer, max_norm, device
        self.param_groups, self.defaults, self.state = optimizer.param_groups, optimizer.defaults, optimizer.state
        self.overflow = False
        self._global_grad_norm: float | None = None

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
                 evaluate_at_start: bool = False):
        """`evaluators` run at every evaluation on the (unwrapped) model; their metrics join val_loss.
        `evaluate_at_start`: a fresh (not resumed) run logs an evaluation of the starting model as step 0."""
        self.config, self.runtime, self.objective = config, runtime, objective
        self.train_data, self.val_data, self.tokenizer = train_data, val_data, tokenizer
        self.evaluators = evaluators or []
        self.evaluates = val_data is not None or bool(self.evaluators)
        self.evaluate_at_start = evaluate_at_start
        self.out_dir = Path(config.checkpoint.out_dir)
        self.checkpoints = CheckpointManager(self.out_dir, config.checkpoint.keep_checkpoint_max, runtime)
        self.resume_from = self.checkpoints.resume_path(config.checkpoint.resume)  # DeepSpeed's setup depends on it
        self.sampler = ResumableDistributedSampler(train_data, runtime.rank, runtime.world_size, config.optim.seed)
        micro_per_epoch = self.sampler.per_rank // config.optim.batch_size
        if micro_per_epoch == 0:
            raise ConfigError(f"the training data ({len(train_data)} sequences over {runtime.world_size} ranks) "
                              f"is smaller than one batch of {config.optim.batch_size}")
        optim = config.optim
        self.total_steps = optim.max_steps or max(1, optim.epochs * micro_per_epoch // optim.accumulation_steps)
        self.flops_per_token = flops_per_token(base_model(model), config.model.max_seq_len)
        self._setup_engine(model)

    # ------------------------------------------------------------------------------------------------ setup

    def _setup_engine(self, model: torch.nn.Module) -> None:
        config, runtime = self.config, self.runtime
        if config.parallel.compiles(runtime.device):
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
                zero = ds_config.get("zero_optimization", {}).get("stage", 0)
                if zero == 0 and not any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16")):
                    optimizer = CheckedStep(optimizer, ds_config.get("gradient_clipping", 0.0), runtime.device)
                    ds_config["gradient_clipping"] = 0.0
            self.loss_scaled = bool(ds_config.get("fp16", {}).get("enabled"))
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_config,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                lr_scheduler=lambda opt: build_scheduler(opt, config.optim, self.total_steps))
            self.scaler = None
        else:
            model.to(runtime.device)
            self.optimizer = build_optimizer(model, config.optim, runtime.device)
            self.scheduler = build_scheduler(self.optimizer, config.optim, self.total_steps)
            if runtime.world_size > 1:
                ids = [runtime.device.index] if runtime.device.type == "cuda" else None
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                                  find_unused_parameters=has_moe)
            self.engine = model
            fp16 = runtime.dtype == torch.float16 and runtime.device.type == "cuda"
            self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
            self.loss_scaled = fp16

    def autocast(self):
        if self.runtime.use_deepspeed or self.runtime.dtype == torch.float32:
            return contextlib.nullcontext()  # DeepSpeed casts the model itself
        return torch.autocast(self.runtime.device.type, dtype=self.runtime.dtype)

    # ------------------------------------------------------------------------------------------------ steps

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.runtime.device, non_blocking=True) for k, v in batch.items()}

    def micro_step(self, batch: dict[str, torch.Tensor], boundary: bool) -> tuple[torch.Tensor, dict]:
        """Forward + backward of one micro-batch; the optimizer steps on the boundary. Returns (the detached loss,
        metrics), left on the device: nothing here waits for the GPU."""
        accumulation = self.config.optim.accumulation_steps
        if self.runtime.use_deepspeed:
            loss, metrics = self.objective.loss(self.engine, batch)
            self.engine.backward(loss)
            self.engine.step()
            return loss.detach(), metrics
        sync = boundary or not isinstance(self.engine, torch.nn.parallel.DistributedDataParallel)
        with (contextlib.nullcontext() if sync else self.engine.no_sync()), self.autocast():
            loss, metrics = self.objective.loss(self.engine, batch)
        scaled = loss / accumulation
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach(), metrics

    def optimizer_step(self, loss_finite: bool) -> tuple[float, bool]:
        """Plain PyTorch: clip, step, schedule, unless the loss or the gradient norm is not finite; DeepSpeed already
        stepped (or skipped) in micro_step. Returns (the gradient norm before clipping, whether the step was applied).
        The gradients are averaged over ranks (DDP) and the loss flag is agreed, so every rank decides alike."""
        if self.runtime.use_deepspeed:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan"), self.engine.was_step_applied()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.engine.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip or float("inf")).item()
        applied = loss_finite and math.isfinite(norm)
        if applied:
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.scheduler.step()
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    # ------------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean objective loss over up to `eval_batches` validation batches per rank, averaged over ranks, plus the
        evaluators' metrics. `val_ppl` only for objectives that report an LM loss (not for DPO's)."""
        with torch.compiler.set_stance("force_eager"):  # other shapes (generation) would only recompile
            metrics = self._validation_loss() if self.val_data is not None else {}
            for evaluator in self.evaluators:
                metrics.update(evaluator(unwrap(self.engine)))
        return metrics

    def _validation_loss(self) -> dict[str, float]:
        sampler = ResumableDistributedSampler(self.val_data, self.runtime.rank, self.runtime.world_size,
                                              self.config.optim.seed, shuffle=False)
        loader = make_loader(self.val_data, sampler, self.config.optim.batch_size, 0)
        self.engine.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        has_lm_loss = False
        for index, batch in enumerate(loader):
            if self.config.track.eval_batches and index == self.config.track.eval_batches:
                break
            with self.autocast():
                loss, metrics = self.objective.loss(self.engine, self.to_device(batch))
            has_lm_loss = "lm_loss" in metrics
            totals += torch.tensor([loss.item(), float(metrics.get("lm_loss", 0.0)), 1.0], dtype=torch.float64)
        self.engine.train()
        totals = all_reduce_mean(totals.to(self.runtime.device)).cpu()
        if totals[2] == 0:
            return {}
        metrics = {"val_loss": (totals[0] / totals[2]).item()}
        if has_lm_loss:
            metrics["val_ppl"] = math.exp(min((totals[1] / totals[2]).item(), 50.0))
        return metrics

    # ------------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to `total_steps` (or until SIGINT/SIGTERM); returns the last step, losses and whether it stopped."""
        config, runtime = self.config, self.runtime
        state = {"step": 0, "epoch": 0, "samples_in_epoch": 0, "best_val_loss": None, "run_id": None,
                 "nonfinite_steps": 0}
        resume_from = self.resume_from
        seed_everything(config.optim.seed + runtime.rank)  # a resume restores the RNG of each rank that saved one
        if resume_from is not None:
            state.update(self.checkpoints.load(resume_from, self.engine, self.optimizer, self.scheduler))
            if runtime.is_main:
                print(f"[train] resumed from {resume_from} at step {state['step']}", flush=True)
        tracker = Tracker(config, self.out_dir, runtime.is_main, state["run_id"], state["step"])
        state["run_id"] = tracker.run_id
        tracker.watch(unwrap(self.engine))
        tracker.log_code(REPO_ROOT)
        if self.evaluate_at_start and self.evaluates and resume_from is None:
            tracker.log(0, self.evaluate())
        peak = peak_flops(runtime.device, config.track.peak_flops) if runtime.is_main else 0.0
        self.engine.train()
        try:
            return self._loop(state, tracker, peak)
        finally:
            tracker.finish()

    def _roll_epoch(self, state: dict) -> None:
        if self.sampler.per_rank_left(state["samples_in_epoch"]) < self.config.optim.batch_size:
            state["epoch"] += 1
            state["samples_in_epoch"] = 0

    def _loop(self, state: dict, tracker: Tracker, peak: float) -> dict:
        config, runtime = self.config, self.runtime
        step, accumulation = state["step"], config.optim.accumulation_steps
        progress = Progress(self.out_dir.name, self.total_steps, step, runtime.is_main)
        window_start, window_tokens = time.perf_counter(), 0
        # per-micro-batch figures stay on the device until a log step (the loss is read once per optimizer step)
        losses, extra, loads, load_count, micro = [], {}, 0.0, 0, 0
        step_loss, val, stopped, halted = float("nan"), {}, False, False
        streak, last_good = 0, step  # non-finite steps in a row; the last step applied
        with StopRequest(self.out_dir) as stop:
            if runtime.is_main:
                stop.remove_stale()
                print(stop.stop_hint(), flush=True)
            loader = make_loader(self.train_data, self.sampler, config.optim.batch_size, config.data.num_workers,
                                 pin_memory=runtime.device.type == "cuda")
            while step < self.total_steps and not stopped:
                self.sampler.set_position(state["epoch"], state["samples_in_epoch"])
                for batch in loader:
                    micro += 1
                    state["samples_in_epoch"] += config.optim.batch_size * runtime.world_size
                    batch = self.to_device(batch)
                    window_tokens += batch_tokens(batch)
                    if (micro - 1) % accumulation == 0:
                        step_lr = self.current_lr()  # the rate this step uses (the scheduler moves on in the step)
                        tracker.begin_step(step + 1)
                    loss, metrics = self.micro_step(batch, boundary=micro % accumulation == 0)
                    losses.append(loss)
                    for key, value in metrics.items():
                        extra[key] = extra.get(key, 0.0) + value / accumulation
                    moe_model = base_model(self.engine)
                    load = moe_model.expert_load() if hasattr(moe_model, "expert_load") else None
                    if load is not None:
                        loads, load_count = loads + load.float(), load_count + 1
                    if micro % accumulation:
                        continue

                    # the mean over ranks: not finite on every rank when it is on one
                    step_loss = all_reduce_mean(torch.stack(losses).float().mean().reshape(1)).item()
                    grad_norm, applied = self.optimizer_step(math.isfinite(step_loss))
                    step += 1
                    state["step"] = step
                    self._roll_epoch(state)
                    nonfinite = not math.isfinite(step_loss) or (not math.isfinite(grad_norm) and not self.loss_scaled)
                    if nonfinite:
                        state["nonfinite_steps"] += 1
                        streak += 1
                        halted = streak >= config.optim.max_nonfinite_steps
                        if runtime.is_main:
                            print(f"\n[train] step {step}: loss {step_loss:.4g}, grad_norm {grad_norm:.4g}: not "
                                  f"finite, optimizer step {'applied' if applied else 'skipped'} ({streak} in a row, "
                                  f"max_nonfinite_steps {config.optim.max_nonfinite_steps})", flush=True)
                    elif applied:
                        streak, last_good = 0, step
                    progress.update()
                    if nonfinite or step % config.track.log_interval == 0 or step == self.total_steps:
                        elapsed = time.perf_counter() - window_start
                        tokens_per_sec = window_tokens * runtime.world_size / max(elapsed, 1e-9)
                        if extra:  # the objective's own metrics (lm_loss, DPO rewards, ...), averaged over ranks
                            values = torch.stack([torch.as_tensor(v, device=runtime.device).double().reshape(())
                                                  for v in extra.values()])
                            averaged = all_reduce_mean(values).tolist()
                            extra = dict(zip(extra, averaged))
                        row = {"loss": step_loss, "lr": step_lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                               "epoch": state["epoch"], "nonfinite_steps": state["nonfinite_steps"],
                               **{k: v for k, v in extra.items() if k not in ("lm_loss", "aux_loss")},
                               **memory_metrics(runtime.device), **gpu_utilization_metrics(runtime.device)}
                        if "lm_loss" in extra:
                            row["ppl"] = math.exp(min(extra["lm_loss"], 50.0))
                        if peak > 0:
                            row["mfu"] = self.flops_per_token * tokens_per_sec / (peak * runtime.world_size)
                        if load_count:  # averaged over the steps since the last log line, and over ranks
                            load = all_reduce_mean(loads / load_count).cpu()
                            row.update(expert_load_metrics(load, extra.get("aux_loss")))
                        tracker.log(step, row)
                        progress.log(step, row)
                        window_start, window_tokens, loads, load_count = time.perf_counter(), 0, 0.0, 0
                    losses, extra = [], {}

                    stopped = any_rank(stop.requested, runtime.device) or halted
                    save_now = (step % config.checkpoint.save_interval_steps == 0 or stopped
                                or step == self.total_steps)
                    if self.evaluates and (step % config.track.eval_interval == 0 or save_now):
                        val = self.evaluate()
                        tracker.log(step, val)
                        progress.log_eval(step, val)
                    if save_now:
                        self._save(step, state, val.get("val_loss"))
                    if stopped and runtime.is_main and stop.file_requested():
                        stop.stop_file.unlink(missing_ok=True)  # honoured: a resume must not stop at once
                        print(f"[train] {stop.stop_file} found: checkpoint saved, the file removed", flush=True)
                    if stopped or step >= self.total_steps:
                        break
                else:
                    self._roll_epoch(state)
        progress.close()
        if halted:
            raise TrainingHalted(
                f"the loss or gradient was NaN/inf in {streak} steps in a row (steps {step - streak + 1}-{step}, "
                f"max_nonfinite_steps {config.optim.max_nonfinite_steps}); stopped at step {step} with checkpoint "
                f"{self.out_dir / 'checkpoints' / step_name(step)}, whose weights are those after step {last_good}; "
                "lower learning_rate or check the data, then run the same command to resume")
        if not stopped:
            save_hf(self.engine, self.tokenizer, self.out_dir / "final", runtime)
            tracker.log_model_dir(self.out_dir / "final", step)
        elif runtime.is_main:
            print(f"[train] stopped at step {step}; checkpoint saved, run the same command to resume", flush=True)
        return {"step": step, "loss": step_loss, "val_loss": val.get("val_loss"),
                "best_val_loss": state["best_val_loss"], "stopped": stopped, "is_main": runtime.is_main}

    def _save(self, step: int, state: dict, val_loss: float | None) -> None:
        best = state["best_val_loss"]
        is_best = val_loss is not None and math.isfinite(val_loss) and (best is None or val_loss < best)
        if is_best:
            state["best_val_loss"] = val_loss
        self.checkpoints.save(step, self.engine, self.optimizer, self.scheduler, dict(state), self.config, is_best)
        if is_best:
            save_hf(self.engine, self.tokenizer, self.out_dir / "best", self.runtime)
