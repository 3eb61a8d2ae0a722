"""SFT with packed rows against one conversation per row, side by side: the same conversations, model and flags
through 5.full_sft.py, reporting steps per epoch, real (non-padding) tokens/s and the held-out loss.

    python benchmarks/bench_sft_packing.py                      # CPU: dim 256, 4 layers, seq 512, batch 8, 1 epoch
    python benchmarks/bench_sft_packing.py --device cuda --dim 512 --layers 8 --batch 32

- Conversations: LLaMA-Factory's alpaca_en_demo, alpaca_zh_demo and identity files from $MATECONV_SHARED_DATA
  (default ../shared/data), shuffled with a fixed seed; the last --heldout of them are held out.
- Tokenizer: MiniMind's 6400-token one (adopted by mateconv.tokenizer), the one the seeds use.
- Three runs of one epoch each, all from the same random initialisation (no pretraining: what differs is only how
  the trainer lays out the same data): one conversation per row at --batch rows per step (MiniMind's layout);
  packed rows at --batch; packed rows at the batch that holds about as many conversations per step as the first
  (so about the same number of updates).
- Real tokens: the conversations' tokens (each truncated to --seq), the same in every run; real tokens/s is that over
  the training loop's time (end of step 1 to the last step, from metrics.jsonl; start-up and the first step left out).
- Held-out loss: token-weighted next-token loss on the assistant tokens of the held-out conversations
  (mateconv.logprobs.perplexity on one conversation per row), for each final model.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bench_vs_minimind import DEVICE_FLAGS, MINIMIND, REPO, SHARED_DATA, load_average, run_trainer, table
from mateconv.data.shards import SFTTokens
from mateconv.files import read_metrics, write_atomic
from mateconv.logprobs import perplexity
from mateconv.terminal import bars_only_on_a_terminal
from mateconv.tokenizer import adopt_tokenizer
from model import MateConvForCausalLM

SOURCES = ("alpaca_en_demo.json", "alpaca_zh_demo.json", "identity.json")


def build_conversations(work: Path, heldout: int) -> dict[str, Path]:
    records = []
    for name in SOURCES:
        records += json.loads((SHARED_DATA / "hiyouga__LLaMA-Factory" / "data" / name).read_text(encoding="utf-8"))
    random.Random(0).shuffle(records)
    paths = {"train": work / "sft_train.jsonl", "val": work / "sft_val.jsonl"}
    for split, part in (("train", records[:-heldout]), ("val", records[-heldout:])):
        write_atomic(paths[split], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return paths


def tokenize(work: Path, raw: Path, split: str, env: dict) -> Path:
    tokens = work / "tokens" / split
    subprocess.run([sys.executable, "3.dataset.py", "--kind", "sft", "--input", str(raw), "--out_dir", str(tokens),
                    "--tokenizer", str(work / "tokenizer"), "--workers", "1", "--no_progress"],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return tokens


def run_sft(args, work: Path, name: str, tokens: Path, batch: int, packing: bool, env: dict) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--data_path", tokens, "--val_data_path", "", "--tokenizer_path", work / "tokenizer", "--out_dir", out,
             "--init_from", "", "--dim", args.dim, "--n_layers", args.layers, "--n_heads", 8, "--n_kv_heads", 4,
             "--vocab_size", 6400, "--max_seq_len", args.seq, "--batch_size", batch, "--epochs", 1,
             "--max_steps", 0, "--learning_rate", args.lr, "--warmup_iters", 0, "--log_interval", 1,
             "--save_interval_steps", 100_000, "--tracker", "none", "--num_workers", 0, "--engine", "torch",
             "--compile", args.compile, "--seed", 42, "--packing", "true" if packing else "false",
             *DEVICE_FLAGS[args.device]]
    result = run_trainer(name, ["5.full_sft.py", *map(str, flags)], REPO, env, work / f"{name}.log")
    rows = [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    times = {row["step"]: row["time"] for row in rows}
    return {**result, "steps": max(times), "train_s": times[max(times)] - times[1], "final": out / "final"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench_sft_packing", help="working directory (rewritten)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--heldout", type=int, default=100, help="conversations held out")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="rows per step of the unpacked run")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--compile", type=int, choices=[0, 1], default=0)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the trainers")
    args = parser.parse_args()
    bars_only_on_a_terminal()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but CUDA is not available")
    for needed in (SHARED_DATA / "hiyouga__LLaMA-Factory", MINIMIND / "model"):
        if not needed.exists():
            raise SystemExit(f"bench: {needed} not found (set MATECONV_SHARED_DATA / MATECONV_MINIMIND)")

    work = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    raw = build_conversations(work, args.heldout)
    adopt_tokenizer(MINIMIND / "model", work / "tokenizer")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": args.device}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    tokens = {split: tokenize(work, path, split, env) for split, path in raw.items()}
    single = SFTTokens(tokens["train"], args.seq)
    packed = SFTTokens(tokens["train"], args.seq, packing=True)
    real_tokens = single.num_real_tokens
    per_row = len(single) / len(packed)
    runs = {"one conversation per row": (args.batch, False), "packed, same batch": (args.batch, True),
            "packed, same conversations per step": (max(1, round(args.batch / per_row)), True)}
    heldout = SFTTokens(tokens["val"], args.seq)
    rows, reference = [], None
    for name, (batch, packing) in runs.items():
        run = run_sft(args, work, name.replace(" ", "_").replace(",", ""), tokens["train"], batch, packing, env)
        model = MateConvForCausalLM.from_pretrained(run["final"]).eval()
        loss = perplexity(model, heldout, batch_size=16).loss
        rate = real_tokens * (run["steps"] - 1) / run["steps"] / run["train_s"]  # step 1 is not timed
        reference = reference or rate
        rows.append({"run": name, "rows per step": batch, "steps": run["steps"],
                     "training time (s)": f"{run['train_s']:.1f}", "real tokens/s": f"{rate:,.0f}",
                     "vs one per row": f"{rate / reference:.2f}x", "held-out loss": f"{loss:.4f}",
                     "peak RSS (GB)": f"{run['rss_gb']:.2f}"})
    summary = (f"{len(single)} training conversations ({real_tokens:,} tokens at seq {args.seq}), "
               f"{per_row:.2f} per packed row; {len(packed)} packed rows; dim {args.dim}, {args.layers} layers, "
               f"{args.device}, load average {load_average()}\n\n{table(rows)}\n")
    write_atomic(work / "table.md", summary)
    print(summary)


if __name__ == "__main__":
    main()
