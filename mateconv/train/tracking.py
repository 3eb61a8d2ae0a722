"""Metrics: `metrics.jsonl` (always, rank 0), W&B or TensorBoard, FLOPs per token and MFU, MoE expert-load stats;
progress for people: a bar on a terminal, plain lines in a log.

W&B runs offline (`WANDB_MODE=offline`, files under `<out_dir>/wandb/`) when no API key is configured.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import torch
from torch import nn
from tqdm import tqdm

from mateconv.config import TrainConfig, config_to_dict
from mateconv.files import read_metrics, write_atomic
from mateconv.terminal import duration, on_terminal

# Dense bf16/fp16 tensor-core peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "A10G": 70e12, "A10": 125e12, "A6000": 155e12, "4090": 165e12, "3090": 71e12, "V100": 125e12,
    "T4": 65e12,
}


def active_parameters(model: nn.Module, trainable: bool = False) -> int:
    """Parameters a token's forward multiplies by: no embedding lookups, the lm_head once (also when tied), and for
    MoE layers only `top_k` of the routed experts. `trainable`: only those that train (LoRA's adapters, not the
    frozen weights they adapt)."""
    def counted(p: nn.Parameter) -> bool:
        return p.requires_grad or not trainable

    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids and counted(p))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and id(output.weight) in embedding_ids and counted(output.weight):
        total += output.weight.numel()
    for module in model.modules():
        experts, top_k = getattr(module, "experts", None), getattr(module, "top_k", None)
        if isinstance(experts, nn.ModuleList) and isinstance(top_k, int) and len(experts) > top_k:
            per_expert = sum(p.numel() for p in experts[0].parameters() if counted(p))
            total -= (len(experts) - top_k) * per_expert
    return total


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 2 x active parameters for the forward, 2 x for the gradients of the activations and
    2 x the trainable ones for the weights' (6 x active parameters when all train, 4 x plus LoRA's adapters for LoRA,
    whose frozen weights get no gradient), plus attention scores (PaLM appendix B: 12 * L * d * T)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    weights = 4.0 * active_parameters(model) + 2.0 * active_parameters(model, trainable=True)
    return weights + 12.0 * layers * hidden * seq_len


def run_facts(model: nn.Module, config: TrainConfig, world_size: int) -> dict[str, dict]:
    """What the W&B config adds to the flags. `model`: the model section as the model trained has it (with init_from
    the saved model's own config counts, not the model flags, which would show defaults: `use_moe` false for a MoE
    model's SFT) and its class. `run`: the model's parameters (all, trainable, active per token: MoE runs compare
    with dense ones on these), the ranks and the examples per optimizer step over all of them (the global batch)."""
    own, optim = model.config, config.optim
    section = {name: getattr(own, name) for name in config_to_dict(config)["model"] if hasattr(own, name)}
    facts = {"parameters": sum(p.numel() for p in model.parameters()),
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "active_parameters": active_parameters(model), "world_size": world_size,
             "global_batch_size": optim.batch_size * optim.accumulation_steps * world_size}
    return {"model": {**section, "architecture": type(model).__name__}, "run": facts}


def measure_cpu_flops(size: int = 1024, repeats: int = 10) -> float:
    """fp32 matmul FLOP/s of this process's threads on this CPU (the practical peak for MFU on CPUs): the fastest of
    `repeats` products, as a mean would count the moments other programs (W&B's service starting, the other ranks'
    first steps) held the cores, making a peak that a later, quieter training exceeds."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: the thread pool starts
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size ** 3 / fastest


def peak_flops(device: torch.device, override: float = 0.0) -> float:
    """Peak FLOP/s per device: the flag if set, the table for known GPUs, a matmul measurement on CPU (0 = unknown)."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), 0.0)
    return measure_cpu_flops()


def expert_load_metrics(load: torch.Tensor, aux_loss: float | None) -> dict[str, float]:
    """load [n_layers, n_experts] token fractions -> per-expert fractions, coefficient of variation per layer."""
    metrics: dict[str, float] = {}
    for layer, row in enumerate(load.float()):
        for expert, fraction in enumerate(row.tolist()):
            metrics[f"moe/layer{layer}/expert{expert}"] = fraction
        metrics[f"moe/layer{layer}/cv"] = (row.std(unbiased=False) / row.mean().clamp(min=1e-12)).item()
    metrics["moe/cv_mean"] = sum(metrics[f"moe/layer{i}/cv"] for i in range(load.shape[0])) / load.shape[0]
    if aux_loss is not None:
        metrics["moe/aux_loss"] = aux_loss
    return metrics


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"memory/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
                "memory/peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"memory/rss_gb": psutil.Process().memory_info().rss / 2**30}


_nvml_unavailable = False


def gpu_utilization_metrics(device: torch.device) -> dict[str, float]:
    """`gpu/utilization`: percent of the last NVML sample period (1/6 to 1 s) in which a kernel ran. Empty on CPU, and
    (after one failed try) without nvidia-ml-py or an NVML driver library."""
    global _nvml_unavailable
    if device.type != "cuda" or _nvml_unavailable:
        return {}
    try:
        return {"gpu/utilization": float(torch.cuda.utilization(device))}
    except Exception:  # ModuleNotFoundError (no pynvml), RuntimeError or pynvml.NVMLError (no driver library)
        _nvml_unavailable = True
        return {}


def is_project_source(path: str, root: str) -> bool:
    """The code worth keeping with a run: `.py` files of the model/ and mateconv/ packages and the top-level numbered
    stage scripts (nothing from .venv, out/, wandb/, tests)."""
    parts = Path(path).relative_to(root).parts
    if not parts[-1].endswith(".py"):
        return False
    return parts[0] in ("model", "mateconv") or (len(parts) == 1 and parts[0][0].isdigit())


class Tracker:
    """Rank 0 writes `metrics.jsonl` and the W&B/TensorBoard run; other ranks do nothing."""

    def __init__(self, config: TrainConfig, out_dir: Path, enabled: bool, run_id: str | None = None,
                 resumed_step: int = 0, stage: str | None = None):
        """`stage` (pretrain, sft, dpo, cpt) is the W&B run's job type: a pipeline's runs, put in one group by
        $WANDB_RUN_GROUP, are told apart (and filtered) by it."""
        self.enabled, self.track = enabled, config.track
        self.kind = self.track.tracker if enabled else "none"
        self.path = Path(out_dir) / "metrics.jsonl"
        self.project = self.track.wandb_project or os.environ.get("WANDB_PROJECT") or "mateconv"
        self.run_id = run_id
        self.run = self.writer = None
        self.rows_lost = False  # a row could not be written to metrics.jsonl (said once)
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._truncate_after(resumed_step)
        if self.kind == "wandb":
            import wandb

            self.run_id = run_id or wandb.sdk.lib.runid.generate_id()
            # a resumed run's directories too: with --id W&B syncs several of one run in order of their start
            sync = f"`wandb sync --id {self.run_id} {out_dir}/wandb/offline-run-*-{self.run_id}`"
            settings = dict(project=self.project, entity=self.track.wandb_entity or None,
                            name=self.track.wandb_run_name or None, id=self.run_id,
                            job_type=stage, resume="allow", dir=str(out_dir), config=config_to_dict(config))
            if not os.environ.get("WANDB_MODE") and not wandb_logged_in():  # else W&B would ask for a key
                print(f"[train] W&B: no API key ($WANDB_API_KEY or `wandb login`): logging offline; upload the run "
                      f"later with {sync}", flush=True)
                settings["mode"] = "offline"
            try:
                self.run = wandb.init(**settings)
            except wandb.errors.Error as error:  # server unreachable, key refused: the training goes on, logged here
                reason = (str(error).splitlines() or [""])[0]
                print(f"[train] W&B: {type(error).__name__}: {reason}; logging offline to {out_dir}/wandb instead "
                      f"({sync} uploads it later)", flush=True)
                wandb.teardown()
                self.run = wandb.init(**{**settings, "mode": "offline"})
        if self.kind == "tensorboard" or self.track.tensorboard_dir:  # a directory asked for: beside W&B too
            from torch.utils.tensorboard import SummaryWriter

            # as metrics.jsonl: TensorBoard hides the earlier runs' events from the first step logged from here on
            self.writer = SummaryWriter(log_dir=self.track.tensorboard_dir or str(Path(out_dir) / "tensorboard"),
                                        purge_step=resumed_step + 1 if resumed_step > 0 else 0)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop the rows logged after the checkpoint (they are about to be replayed); a fresh run (step 0)
        starts the file over."""
        if not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if step > 0 and row.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def log(self, step: int, metrics: dict[str, float], at: float | None = None) -> None:
        """`at`: the wall-clock time the row belongs to (a step's end, when it is logged later), else now."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() if at is None else at, 3), **metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk: tracking never stops a training (a checkpoint save that fails does)
            if not self.rows_lost:
                print(f"\n[train] cannot write {self.path} ({e.strerror}): its rows are left out while that lasts; "
                      "training goes on", flush=True)
            self.rows_lost = True
        if self.run is not None:
            with self._wandb_call():
                self.run.log(metrics, step=step)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    @contextmanager
    def _wandb_call(self) -> Iterator[None]:
        """A W&B call that finds W&B's service gone (a DeepSpeed launcher stopping the run sends SIGTERM to each rank's
        process tree, the service included) is one line, and W&B is off for the rest of the stage: the stage goes on
        to its checkpoint, `metrics.jsonl` keeps every row, and the run's file holds the rows before."""
        import wandb

        try:
            yield
        except (OSError, wandb.errors.Error) as error:
            print(f"[train] W&B: its service stopped ({type(error).__name__}: {error}); W&B logs no more in this "
                  f"stage, {self.path} keeps every row", flush=True)
            if self.track.wandb_watch:
                self.run.unwatch()  # its hooks would log from the backward passes
            self.run = None
            with suppress(OSError, wandb.errors.Error):  # now, not as a traceback at exit (W&B's atexit hook)
                wandb.teardown()

    def add_run_facts(self, facts: dict[str, dict]) -> None:
        """`run_facts` into the W&B config: its `model` section in place of the flags', its `run` section beside
        them (a resume on another number of ranks updates it)."""
        if self.run is not None:
            with self._wandb_call():
                self.run.config.update(facts, allow_val_change=True)

    def watch(self, model: nn.Module) -> None:
        """W&B histograms of gradients and/or parameters every `wandb_watch_freq` backward passes (micro-batches)."""
        if self.run is not None and self.track.wandb_watch:
            self.run.watch(model, log=self.track.wandb_watch, log_freq=self.track.wandb_watch_freq)

    def begin_step(self, step: int) -> None:
        """Move W&B to `step` before its backward passes: wandb.watch logs its histograms without a step, onto the
        row W&B is at, which would otherwise still be the previous step."""
        if self.run is not None and self.track.wandb_watch:
            with self._wandb_call():
                self.run.log({}, step=step, commit=False)

    def log_code(self, root: Path) -> None:
        """The project's source files (`is_project_source`) as the run's W&B code artifact `source-<project>-<stage>`."""
        if self.run is not None and self.track.wandb_log_code:
            self.run.log_code(str(root), name=f"source-{self.project}-{self.path.parent.name}",
                              include_fn=is_project_source, exclude_fn=lambda path, root: False)

    def log_model_dir(self, path: Path, step: int, final: bool) -> None:
        """A saved Hugging Face directory as a version of the run's W&B artifact of type "model", named
        `<stage>-<run name or id>`, with the aliases `step-<step>`, `latest` and for the final model `final`. W&B
        copies the files at once (its staging area; the upload follows in the background). A model W&B refuses is
        one line: training goes on, the files on disk are as saved."""
        if self.run is None or not self.track.wandb_log_model:
            return
        import wandb

        name = re.sub(r"[^\w.-]+", "-", f"{self.path.parent.name}-{self.run.name or self.run.id}")
        try:
            artifact = wandb.Artifact(name, type="model", metadata={"step": step})
            artifact.add_dir(str(path))
            self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"] + (["final"] if final else []))
        except (wandb.errors.Error, OSError, ValueError) as error:
            reason = (str(error).splitlines() or [""])[0]
            print(f"[train] W&B: the model of step {step} was not logged as an artifact ({type(error).__name__}: "
                  f"{reason}); the run's own files are saved as ever", flush=True)

    def finish(self, exit_code: int = 0) -> None:
        """`exit_code` 1: the stage raised (the W&B run is marked failed; its offline directory still syncs)."""
        if self.run is not None:
            with self._wandb_call():
                self.run.finish(exit_code=exit_code)
        if self.writer is not None:
            self.writer.close()


def wandb_logged_in() -> bool:
    """Whether W&B has a key for its server without asking for one: $WANDB_API_KEY or $WANDB_IDENTITY_TOKEN_FILE, a
    `wandb login` (the netrc entry of the server W&B's settings name, a self-hosted one's after `wandb login --host`),
    or an api_key in W&B's settings files."""
    import wandb
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib.wbauth import wbnetrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = wandb_setup.singleton().settings
    try:
        return bool(settings.api_key or wbnetrc.read_netrc_auth(host=settings.base_url))
    except wandb.errors.Error:  # a malformed key: wandb.init says what is wrong with it
        return True


class Progress:
    """Training progress on rank 0: a tqdm bar on a terminal; otherwise one plain line per logged step (step, loss, lr,
    grad norm, tokens/s, elapsed, ETA) and per evaluation, for `tail -f` and `grep`."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool):
        self.name, self.total, self.initial = name, total, initial
        self.plain = enabled and not on_terminal()
        self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True) \
            if enabled and not self.plain else None
        self.start = time.perf_counter()

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, row: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:,.0f}")
        if not self.plain:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - self.initial, 1) * (self.total - step)
        memory = row.get("memory/peak_gb", row.get("memory/rss_gb"))  # the GPU's peak so far, else the process's
        print(f"[{self.name}] step {step}/{self.total} loss {row['loss']:.4f} lr {row['lr']:.3e} "
              f"grad_norm {row['grad_norm']:.4f} tok/s {row['tokens_per_sec']:,.0f}"
              f"{f' mem_gb {memory:.2f}' if memory is not None else ''} elapsed {duration(elapsed)} eta {duration(eta)}",
              flush=True)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.plain and metrics:
            shown = " ".join(f"{key} {value:.4f}" for key, value in metrics.items() if not key.startswith("moe/"))
            print(f"[{self.name}] eval step {step} {shown}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
