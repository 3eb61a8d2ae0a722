"""Data loading: a seeded, rank-sharded sampler that can start in the middle of an epoch (exact resume), and
evaluation means over data that the ranks split (`split_means`)."""
from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from mateconv.train.distributed import all_reduce_mean

# A batch's metrics, each as (its mean over the batch, the weight of that mean: how many rows or tokens it averages)
Measure = Callable[[dict[str, torch.Tensor]], dict[str, tuple[torch.Tensor | float, float]]]


@dataclass(frozen=True)
class StageData:
    """What a stage trains on: its training and validation sets, and the vocabulary of their token ids (checked
    against the model's embeddings; None: not checked)."""
    train: Dataset
    val: Dataset | None = None
    vocab_size: int | None = None


def first_rows(dataset: Dataset, rows: int | None) -> Dataset:
    """The first `rows` examples of `dataset`; all of them when `rows` is None or not below its length."""
    return dataset if rows is None or rows >= len(dataset) else Subset(dataset, range(rows))


class ResumableDistributedSampler(Sampler[int]):
    """Like DistributedSampler (shuffled per epoch with `seed + epoch`, padded to split evenly across ranks, rank r
    taking every world_size-th index from r), plus a position: the number of samples of the current epoch already
    consumed by all ranks together. With that striding they are always a prefix of the epoch's order, so a resumed
    run continues with exactly the next samples, on any number of ranks."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        self.length = len(dataset)
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.per_rank = math.ceil(self.length / world_size)
        self.epoch = 0
        self.consumed = 0

    def set_position(self, epoch: int, consumed: int) -> None:
        self.epoch, self.consumed = epoch, consumed

    def per_rank_left(self, consumed: int) -> int:
        """How many samples each rank still gets in this epoch after `consumed` of them."""
        return math.ceil(max(self.length - consumed, 0) / self.world_size)

    def unpadded_len(self) -> int:
        """How many of this rank's samples (`len(self)`) are not padding: the repeats that even out the ranks come
        after them."""
        return len(range(self.rank, max(self.length - self.consumed, 0), self.world_size))

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        rest = order[self.consumed:]
        rest += order[: self.per_rank_left(self.consumed) * self.world_size - len(rest)]
        return rest[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return self.per_rank_left(self.consumed)


def _ignore_stop_signals(worker_id: int) -> None:
    # `kill -2` on the process group reaches the loader workers too; only the main process decides to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_loader(loader: DataLoader) -> None:
    """Stops a loader's persistent workers now. Left to interpreter exit (a traceback keeps the loader alive until
    then), multiprocessing would stop them with SIGTERM, which they ignore, and wait for them forever."""
    iterator = loader._iterator  # torch keeps persistent workers in the loader's iterator
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int,
                pin_memory: bool = False, drop_last: bool = True) -> DataLoader:
    """Workers persist: each epoch iterates the same loader again (the sampler, read in this process, starts where
    its position says), so an epoch boundary costs no worker restarts (0.2 s each on a GPU run of 22-step epochs).
    Training drops an epoch's short last batch (every step has batch_size rows); validation keeps it.
    The loader draws its workers' seed from a generator of its own: from the global one it would move the RNG that
    dropout uses, and a resumed run, which makes its iterator after restoring that RNG, would train another run."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      pin_memory=pin_memory, worker_init_fn=_ignore_stop_signals if num_workers else None,
                      persistent_workers=num_workers > 0, generator=torch.Generator())


class WeightedMeans:
    """Each metric's sum(mean x weight) / sum(weight) over batches, then over ranks. `add` takes a batch's metrics as
    (mean, weight): a mean on the device stays there (nothing is read per batch), a weight is a host number."""

    def __init__(self):
        self.totals: dict[str, list] = {}  # name: [sum of mean x weight, sum of weight]

    def add(self, means: dict[str, tuple[torch.Tensor | float, float]]) -> None:
        for name, (mean, weight) in means.items():
            total = self.totals.setdefault(name, [0.0, 0.0])  # named on every rank alike, weighed or not
            if weight:  # not the NaN mean of a batch with nothing to average
                total[0] = total[0] + torch.as_tensor(mean, dtype=torch.float64) * weight
                total[1] += weight

    def sums(self, device: torch.device | str) -> torch.Tensor:
        """[metrics, 2]: each metric's two sums over every rank, on `device` (one all-reduce, not read here)."""
        sums = torch.zeros(len(self.totals), 2, dtype=torch.float64, device=device)
        for row, total in zip(sums, self.totals.values()):
            row[0], row[1] = total
        return all_reduce_mean(sums)


def split_means(data: Dataset, batch_size: int, measure: Measure, device: torch.device | str) -> dict[str, float]:
    """Each metric of `measure` over the rows of `data`: sum(mean x weight) / sum(weight) over the batches of every
    rank (`WeightedMeans`), which split the rows (the whole of them without a process group), so the same on any number
    of ranks and with any batch size; a metric that no batch gives weight to is left out. The sampler evens out the
    ranks by repeating rows: a batch of such padding is run on one row and weighs nothing, as every rank must run as
    many forwards as the others (ZeRO-3 gathers the parameters inside them)."""
    grouped = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    sampler = ResumableDistributedSampler(data, rank, world_size, seed=0, shuffle=False)
    real_left = sampler.unpadded_len()
    means = WeightedMeans()
    for batch in make_loader(data, sampler, batch_size, 0, drop_last=False):
        real = min(len(next(iter(batch.values()))), real_left)
        real_left -= real
        measured = measure({key: value[:max(real, 1)] for key, value in batch.items()})
        means.add({name: (mean, weight if real else 0) for name, (mean, weight) in measured.items()})
    sums = means.sums(device).tolist()
    return {name: total / weight for name, (total, weight) in zip(means.totals, sums) if weight > 0}
