"""Training throughput (tokens/s, MFU) of the stage-4 engine: MateConv-0.02B dense, its Hugging Face Llama twin
(`model.export.to_llama`, same weights) and the MateConv MoE preset, all run by the same Trainer with the same
settings (AdamW, fp32 on CPU / auto precision on GPU, same batches), in one process.

    python benchmarks/bench_pretrain.py --seq 128 --batch 4 --steps 5 --rounds 2
    python benchmarks/bench_pretrain.py --seq 512 --batch 64 --steps 30 --warmup 10 --rounds 1 --compile 0 1  # GPU
`--compile 0 1` runs every contender eager and compiled (the engine's `--compile`); `--tiny` shrinks the models to
dim 64, 2 layers (a wiring check, benchmarks/gpu_check.sh --cpu-smoke).
The contenders run in turn `--rounds` times and each keeps its best round (so load from other processes on a shared
machine hits all of them alike). The first `--warmup` steps of each run are excluded; tokens/s and MFU are the
engine's own logged values (MFU against the peak the engine measures at the start of each run on CPU, or the GPU
table).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mateconv.config import TrainConfig, build_config
from mateconv.files import read_metrics
from mateconv.train.distributed import setup
from mateconv.train.engine import Trainer, seed_everything
from mateconv.train.objectives import LMObjective
from mateconv.train.tracking import active_parameters
from model import MateConvForCausalLM, preset_config
from model.export import to_llama


class RandomTokens(Dataset):
    """Random rows packed like stage 3's: documents of 32 to seq_len tokens, position ids restarting at each one,
    so MateConv pays for its per-document attention mask as in real training (the Llama twin gets no position ids
    and attends across the row)."""

    def __init__(self, count: int, seq_len: int, vocab_size: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab_size, (count, seq_len), generator=generator)
        self.positions = torch.zeros(count, seq_len, dtype=torch.long)
        for row in self.positions:
            start = 0
            while start < seq_len:
                length = int(torch.randint(min(32, seq_len), seq_len + 1, (1,), generator=generator))
                row[start: start + length] = torch.arange(min(length, seq_len - start))
                start += length

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "position_ids": self.positions[i]}


def run(name: str, model: torch.nn.Module, config: TrainConfig, data: Dataset, warmup: int) -> dict:
    runtime = setup(config.parallel)
    Trainer(config, runtime, model, LMObjective(), data).fit()
    rows = read_metrics(Path(config.checkpoint.out_dir) / "metrics.jsonl")
    timed = [r for r in rows if "tokens_per_sec" in r and r["step"] > warmup]
    tokens_per_sec = sum(r["tokens_per_sec"] for r in timed) / len(timed)
    mfu = sum(r["mfu"] for r in timed) / len(timed) if "mfu" in timed[0] else float("nan")
    return {"name": name, "params": sum(p.numel() for p in model.parameters()) / 1e6,
            "active": active_parameters(model) / 1e6, "tokens_per_sec": tokens_per_sec, "mfu": mfu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", type=int, nargs="+", choices=[0, 1], default=[0],
                        help="0 eager, 1 torch.compile; several: each contender in each mode")
    parser.add_argument("--tiny", action="store_true", help="dim 64, 2 layers (wiring check)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = RandomTokens(args.batch * args.steps, args.seq, 6400)
    seed_everything(0)
    tiny = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2) if args.tiny else {}
    dense = MateConvForCausalLM(preset_config("mateconv-0.02b", max_seq_len=args.seq, **tiny))
    contenders = {"MateConv-0.02B dense": dense, "HF LlamaForCausalLM (same weights)": to_llama(dense)}
    seed_everything(0)
    contenders["MateConv-0.1B MoE"] = MateConvForCausalLM(preset_config("mateconv-0.1b-moe", max_seq_len=args.seq,
                                                                        **tiny))
    initial = {name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in contenders.items()}
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for index, ((name, model), compiled) in enumerate(itertools.product(contenders.items(), args.compile)):
                model.load_state_dict(initial[name])
                config = build_config(dict(max_seq_len=args.seq, batch_size=args.batch, max_steps=args.steps,
                                           dtype=args.dtype, tracker="none", num_workers=0, log_interval=1,
                                           out_dir=f"{tmp}/{index}_{round_index}", save_interval_steps=10**9,
                                           resume="never", warmup_iters=0, compile=bool(compiled)).items())
                label = f"{name}{', compiled' if compiled else ''}"
                # the engine compiles in place: a compiled run gets its own copy, so eager runs stay eager
                result = run(label, copy.deepcopy(model) if compiled else model, config, data, args.warmup)
                if label not in best or result["tokens_per_sec"] > best[label]["tokens_per_sec"]:
                    best[label] = result
    results = list(best.values())
    reference = next(r for r in results if r["name"].startswith("HF"))["tokens_per_sec"]
    print(f"device {device} ({torch.get_num_threads()} threads), seq {args.seq}, batch {args.batch}, "
          f"{args.steps - args.warmup} timed steps, best of {args.rounds} rounds, torch {torch.__version__}\n")
    print("| model | params (M) | active (M) | tokens/s | MFU | vs HF Llama |\n| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['params']:.1f} | {r['active']:.1f} | {r['tokens_per_sec']:,.0f} | "
              f"{r['mfu']:.1%} | {r['tokens_per_sec'] / reference:.2f}x |")


if __name__ == "__main__":
    main()
