"""Resuming a DeepSpeed ZeRO checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

Under ZeRO-1/2 each rank saves its slice of the optimizer state (`zero_pp_rank_<r>_..._optim_states.pt`), under
ZeRO-3 also its slice of the weights, and DeepSpeed loads such a checkpoint only on the number of ranks that wrote it.
When that number differs, rank 0 converts the checkpoint once with `deepspeed.checkpoint.ds_to_universal` into
`<step>/universal/` (one fp32 file per parameter and per optimizer state, independent of the ranks) and every rank
reads its new slices from there (DeepSpeed's `checkpoint.load_universal`). The conversion costs one pass over the
checkpoint at that resume only; saves stay DeepSpeed's own sharded ones. ZeRO-0 and the plain-PyTorch engine save the
whole state once and resume on any number of ranks as they are.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from mateconv.config import ConfigError
from mateconv.train.distributed import Runtime, barrier, first_error

UNIVERSAL = "universal"


def saved_world_size(path: Path) -> int | None:
    """The number of ranks that wrote a ZeRO-1/2/3 checkpoint (one optimizer shard each); None for other checkpoints."""
    shards = list(Path(path).glob("*zero_pp_rank_*_optim_states.pt"))
    return len(shards) or None


def needs_universal(path: Path | None, runtime: Runtime) -> bool:
    """True when `path` is a ZeRO-partitioned DeepSpeed checkpoint written by another number of ranks."""
    if path is None or not runtime.use_deepspeed:
        return False
    saved = saved_world_size(path)
    return saved is not None and saved != runtime.world_size


def universal_checkpoint(path: Path, runtime: Runtime) -> Path:
    """`<path>/universal/`, converted by rank 0 unless an earlier resume did it. Collective: every rank calls it."""
    target = Path(path) / UNIVERSAL
    error = None
    if runtime.is_main and not target.is_dir():
        print(f"[train] {path.name} was written by {saved_world_size(path)} ranks, this run has {runtime.world_size}: "
              f"converting it to a universal checkpoint in {target}", flush=True)
        error = convert(Path(path), target)
    failed = first_error(error)
    if failed is not None:
        raise ConfigError(f"resume: converting {path} for {runtime.world_size} ranks failed ({failed})")
    barrier()
    return target


def load_universal(engine, path: Path, runtime: Runtime) -> bool:
    """Loads checkpoint `path` into a DeepSpeed engine set up with `checkpoint.load_universal`; False if DeepSpeed
    found nothing to load. Two slips of DeepSpeed's ZeRO-3 universal load are undone (the tests compare with an
    uninterrupted run): it gives every parameter group the first group's hyperparameters, so norms and biases would
    be decayed like matrices (the groups' own, from this run's config, are put back; the learning rate is the
    scheduler's), and it gives every group the same `step` tensor, which Adam then advances once per group and step."""
    where = universal_checkpoint(path, runtime)
    groups = [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
              for group in engine.optimizer.param_groups]
    loaded, _ = engine.load_checkpoint(str(where.parent), tag=where.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    for group, own in zip(engine.optimizer.param_groups, groups):
        group.update(own)
    for state in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return loaded is not None


def convert(path: Path, target: Path) -> str | None:
    """Runs DeepSpeed's converter into a temporary sibling that replaces `target` when complete; returns an error."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = target.with_name(f"{target.name}.incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # MateConv's models carry no Megatron layout info
    try:
        ds_to_universal.main(args)
    except Exception as e:  # the converter raises assorted errors (OSError, RuntimeError, AssertionError, KeyError)
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{e.__class__.__name__}: {e}"
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; MateConv names the tag itself
    tmp.rename(target)
    return None
