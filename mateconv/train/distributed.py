"""Process setup: which engine (DeepSpeed or plain PyTorch), rank/world size, device and precision."""
from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mateconv.config import ConfigError, ParallelConfig
from mateconv.procs import free_port


@dataclass(frozen=True)
class Runtime:
    use_deepspeed: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # compute dtype of the forward/backward (bf16, fp16 or fp32)
    fsdp: bool = False  # plain PyTorch with the parameters sharded over the ranks (`engine fsdp`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_distributed() -> bool:
    """True under `deepspeed` / `torchrun` (they export WORLD_SIZE and RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def every_gpu_command(parallel: ParallelConfig, script: str, argv: list[str]) -> list[str] | None:
    """The command that reruns `script argv` under torchrun with one rank per visible GPU, for engine fsdp started
    without a launcher on a machine with several GPUs (seed 003 starts FSDP with plain `python train.py ...`, and its
    trainer then uses every GPU); None otherwise (launched already, another engine or device, one GPU)."""
    if parallel.engine != "fsdp" or launched_distributed() or parallel.device not in ("auto", "cuda"):
        return None
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), script,
            *argv]


def wants_deepspeed(parallel: ParallelConfig) -> bool:
    if parallel.engine != "auto":
        return parallel.engine == "deepspeed"
    return bool(launched_distributed() or parallel.zero_stage > 0 or parallel.ds_config or parallel.offload_optimizer)


def resolve_device(name: str, local_rank: int) -> torch.device:
    """`auto` (a GPU when there is one), `cpu`, `cuda` (the local rank's GPU) or `cuda:N`; a name torch does not know,
    or a GPU that is not there (seed 000's `--device cuda:0` on a machine without one), is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", max(local_rank, 0))
        if device.index >= (visible := torch.cuda.device_count()):
            raise ConfigError(f"device {device} is not there: {visible} CUDA GPU(s) visible; --device auto takes "
                              "what there is")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on CUDA GPUs that have it, fp16 (with loss scaling) on older GPUs, fp32 on CPUs."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def setup(parallel: ParallelConfig) -> Runtime:
    """Initialise the process group when needed (DeepSpeed and FSDP always; plain PyTorch only under torchrun)."""
    use_deepspeed, fsdp = wants_deepspeed(parallel), parallel.engine == "fsdp"
    alone = (use_deepspeed or fsdp) and not launched_distributed()
    if alone:  # a plain `python 4.pretrain.py --engine deepspeed|fsdp`: one rank, still in a process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))  # DeepSpeed names its CPU buffers after it
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", max(parallel.local_rank, 0)))
    device = resolve_device(parallel.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # DeepSpeed (also imported by transformers' save) would guess its accelerator and print a warning about it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if alone and not dist.is_initialized():
        # An in-process store: a lone rank has no one to meet, so no TCP port that another run could take meanwhile
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        if device.type == "cpu":
            remove_shm_buffer_at_exit(rank)
    elif (world_size > 1 or fsdp) and not dist.is_initialized():
        dist.init_process_group(backend)
    return Runtime(use_deepspeed, rank, local_rank, world_size, device, resolve_dtype(parallel.dtype, device), fsdp)


def shm_buffer(rank: int) -> Path:
    """The file DeepSpeed's CPU all-reduce maps into /dev/shm for `rank` (its shm comm op names it so)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{rank}")


def remove_shm_buffer_at_exit(rank: int) -> None:
    """DeepSpeed on CPU gives each rank a 66 MB buffer in /dev/shm and never removes it: in RAM until a reboot, so
    repeated CPU runs filled the memory (325 of them took 21 of this machine's 24 GB). Each rank removes its own when
    it exits, once every rank has mapped every other's (DeepSpeed does that in init_distributed; the barrier makes
    sure all got that far, so no rank waits for a file already gone)."""
    dist.barrier()
    atexit.register(shm_buffer(rank).unlink, missing_ok=True)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def sum_over_ranks(values: list[int], device: torch.device) -> list[int] | torch.Tensor:
    """`values` summed over ranks, each on its own: alone the ints themselves, else a tensor on `device` that the host
    does not read."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    totals = torch.tensor(values, device=device)
    dist.all_reduce(totals)
    return totals


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks stop at the same step). Called every step:
    alone (one rank, DeepSpeed's launcher included) it costs no collective and no wait for the device."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def first_error(error: str | None) -> str | None:
    """The first rank's error message when any rank has one (every rank gets the same answer), else None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None), None)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly. Exiting with it still open let gloo's threads abort the process at
    teardown ('terminate called without an active exception', exit code 250) after a successful ZeRO-3 run."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
