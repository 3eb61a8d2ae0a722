"""Muon (hidden matrices; AdamW for embeddings, norms, routers) vs AdamW: steps and wall time to reach the same
validation loss, same model, data, batches and schedule, on real text (tinyshakespeare, tokenised here).

    python benchmarks/bench_muon.py --steps 150 --eval-interval 10
The target is the higher of the two runs' best validation losses, so both reach it; each run reports the first
evaluation at or below the target (steps, and wall seconds from the engine's metrics.jsonl timestamps).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from mateconv.config import TrainConfig, build_config
from mateconv.data.tokenizing import build_shards
from mateconv.files import read_metrics
from mateconv.tokenizer import train_tokenizer
from mateconv.train.stages import RECIPES, run

SHARED_DATA = Path(os.environ.get("MATECONV_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHAKESPEARE = SHARED_DATA / "karpathy__char-rnn/data/tinyshakespeare/input.txt"


def prepare(root: Path, vocab_size: int) -> tuple[Path, Path]:
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    (root / "train.txt").write_text("".join(lines[:cut]))
    (root / "val.txt").write_text("".join(lines[cut:]))
    train_tokenizer([root / "train.txt"], root / "tokenizer", vocab_size=vocab_size)
    for split in ("train", "val"):
        build_shards("pretrain", [root / f"{split}.txt"], root / "tokenizer", root / split, progress=False)
    return root / "train", root / "val"


def validation_curve(config: TrainConfig) -> list[dict]:
    start = time.time()
    run(RECIPES["pretrain"], config)
    rows = read_metrics(Path(config.checkpoint.out_dir) / "metrics.jsonl")
    # wall seconds since training started, evaluations included (both optimizers evaluate at the same steps)
    return [{"step": r["step"], "val_loss": r["val_loss"], "seconds": r["time"] - start} for r in rows
            if "val_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--muon-lr", type=float, default=0.02)
    args = parser.parse_args()
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"bench_muon: {SHAKESPEARE} not found (MATECONV_SHARED_DATA names the shared data "
                         "directory)")
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, val_dir = prepare(Path(tmp), args.vocab)
        for name in ("adamw", "muon"):
            config = build_config(dict(
                dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2, vocab_size=args.vocab,
                max_seq_len=args.seq, batch_size=args.batch, max_steps=args.steps, learning_rate=args.adamw_lr,
                muon_lr=args.muon_lr, optimizer=name, warmup_iters=args.steps // 20,
                eval_interval=args.eval_interval, eval_batches=8, tracker="none", num_workers=0, log_interval=10,
                save_interval_steps=10**9, resume="never", out_dir=f"{tmp}/{name}", dtype="float32",
                data_path=str(train_dir), val_data_path=str(val_dir),
                tokenizer_path=str(train_dir.parent / "tokenizer")).items())
            curves[name] = validation_curve(config)
    target = max(min(r["val_loss"] for r in curve) for curve in curves.values())
    print(f"dim {args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}, vocab {args.vocab}, "
          f"{args.steps} steps, lr AdamW {args.adamw_lr} / Muon {args.muon_lr}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\ntarget validation loss {target:.4f}\n")
    print("| optimizer | best val loss | steps to target | seconds to target | s/step |\n| --- | --- | --- | --- | --- |")
    for name, curve in curves.items():
        hit = next(r for r in curve if r["val_loss"] <= target)
        print(f"| {name} | {min(r['val_loss'] for r in curve):.4f} | {hit['step']} | {hit['seconds']:.1f} | "
              f"{curve[-1]['seconds'] / curve[-1]['step']:.3f} |")


if __name__ == "__main__":
    main()
