"""DPO's frozen reference: which model it is, loading it, and its log-probs computed once over the training pairs
and cached next to the data (`--precompute_ref`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from mateconv.config import TrainConfig
from mateconv.files import atomic_dir
from mateconv.logprobs import model_token_logps
from mateconv.train.distributed import Runtime
from mateconv.train.dpo import DPOError, concat_pair
from mateconv.train.ds_config import build_ds_config
from mateconv.train.models import check_vocab, extend_length, load_causal_lm, load_weights

REF_CACHE_VERSION = 2  # 2: pairs left with the same chosen and rejected tokens are not rows


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


def reference_cache_dir(data_dir: Path, ref_model_dir: Path, seq_len: int, dtype: torch.dtype,
                        weights: str = "") -> Path:
    """`weights`: a file of weights loaded into the reference model (`reference_weights`), part of the key."""
    model = model_fingerprint(ref_model_dir) + (f"+{fingerprint_files([Path(weights)])}" if weights else "")
    key = hashlib.blake2b(f"{REF_CACHE_VERSION}|{data_fingerprint(data_dir)}|{model}|{seq_len}|{dtype}".encode(),
                          digest_size=8).hexdigest()
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
        ids, labels, _ = concat_pair(batch)
        logps = model_token_logps(reference, ids, labels)[0].float()
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


def reference_path(config: TrainConfig) -> Path:
    path = Path(config.dpo.ref_model_path or config.checkpoint.init_from)
    if not str(path) or str(path) == ".":
        raise DPOError("DPO needs a starting model: set init_from (default out/sft/final) or ref_model_path")
    if not path.is_dir():
        raise DPOError(f"reference model {path} is not a directory (a saved Hugging Face model; run stage 5 first)")
    return path


def reference_weights(config: TrainConfig) -> str:
    """init_weights, when the reference is the starting model (no ref_model_path): both start from those weights."""
    return "" if config.dpo.ref_model_path else config.checkpoint.init_weights


def load_reference(path: Path, runtime: Runtime, config: TrainConfig, data_vocab: int | None) -> torch.nn.Module:
    """The frozen reference on the training device. Under ZeRO-3 it is sharded like the policy (an inference-only
    DeepSpeed engine), otherwise each rank holds a copy, in the dtype DeepSpeed trains in. It must embed every token
    id of the pairs (`data_vocab`), as the policy must: one of another tokenizer fails here, not in a forward."""
    reference = load_causal_lm(path, "ref_model_path", config.checkpoint.trust_remote_code).eval().requires_grad_(False)
    if weights := reference_weights(config):
        load_weights(reference, weights)
    if data_vocab is not None:
        check_vocab(reference, data_vocab, f"the reference model {path}", "ref_model_path: a model of the policy's "
                    "tokenizer")
    extend_length(reference, config.model.max_seq_len)  # as the policy's (stages.fit_length)
    if runtime.use_deepspeed and config.parallel.zero_stage == 3:
        import deepspeed

        ds = build_ds_config(config, runtime.dtype, runtime.world_size, getattr(reference.config, "hidden_size", 1024))
        ds.pop("optimizer", None)
        ds["zero_optimization"].pop("offload_optimizer", None)
        return deepspeed.initialize(model=reference, config=ds)[0].module
    dtype = runtime.dtype if runtime.use_deepspeed else torch.float32  # plain PyTorch autocasts the forward instead
    return reference.to(runtime.device, dtype)


def with_cached_reference(pairs_list: list, ref_path: Path, runtime: Runtime, config: TrainConfig,
                          data_vocab: int | None) -> list:
    """Each data set of pairs (or None) with its reference log-probs from the cache next to its data; a missing
    cache is computed first, with the reference model loaded once for all of them."""
    reference = None
    cached = []
    for pairs in pairs_list:
        if pairs is None:
            cached.append(None)
            continue
        cache_dir = reference_cache_dir(pairs.directory, ref_path, config.model.max_seq_len, runtime.dtype,
                                        reference_weights(config))
        if ReferenceLogps.exists(cache_dir):
            if runtime.is_main:
                print(f"[dpo] reusing reference log-probs {cache_dir}", flush=True)
        else:
            if reference is None:
                reference = load_reference(ref_path, runtime, config, data_vocab)
            compute_reference_logps(reference, pairs, cache_dir, config.optim.batch_size, runtime.device,
                                    runtime.rank, runtime.world_size)
        cached.append(WithReferenceLogps(pairs, ReferenceLogps(cache_dir)))
    return cached
