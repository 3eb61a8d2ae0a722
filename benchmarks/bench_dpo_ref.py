"""DPO training step time: reference forward on the fly vs reference log-probs precomputed once (--precompute_ref).

Both variants train the same policy from the same weights on the same batches; the script checks that their
first-step losses agree, then times full optimizer steps, alternating the variants in rounds so that noise from
other processes on the machine hits both alike.

    .venv/bin/python benchmarks/bench_dpo_ref.py --steps 6 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from model import MateConvForCausalLM, preset_config

from mateconv.config import DPOConfig
from mateconv.train.dpo import DPOObjective
from mateconv.train.reference import WithReferenceLogps, compute_reference_logps


def random_pairs(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        prompt_len = seq_len // 4
        prompt = torch.randint(3, vocab, (prompt_len,), generator=generator)
        item = {}
        for side in ("chosen", "rejected"):
            total = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=generator))
            ids = torch.zeros(seq_len, dtype=torch.long)
            ids[:prompt_len] = prompt
            ids[prompt_len:total] = torch.randint(3, vocab, (total - prompt_len,), generator=generator)
            labels = torch.full((seq_len,), -100)
            labels[prompt_len:total] = ids[prompt_len:total]
            item.update({f"{side}_input_ids": ids, f"{side}_labels": labels,
                         f"{side}_attention_mask": (torch.arange(seq_len) < total).long()})
        items.append(item)
    return items


def timed_steps(policy, objective, batches) -> tuple[list[float], float]:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    times, first_loss = [], None
    for batch in batches:
        start = time.perf_counter()
        loss, _ = objective.loss(policy, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        first_loss = loss.item() if first_loss is None else first_loss
    return times[1:], first_loss  # first step warms up allocations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mateconv-0.02b", help="model preset (model.PRESETS)")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round (+1 warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = preset_config(args.preset, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    reference = MateConvForCausalLM(config).eval()
    pairs = random_pairs(args.batch_size * (args.steps + 1), args.seq_len, args.vocab_size)
    settings = DPOConfig(beta=0.1, kl_coef=0.05)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = compute_reference_logps(reference, pairs, Path(tmp) / "ref", args.batch_size, "cpu")
        precompute_s = time.perf_counter() - start
        cached_batches = list(DataLoader(WithReferenceLogps(pairs, cache), batch_size=args.batch_size))
        live_batches = list(DataLoader(pairs, batch_size=args.batch_size))
        live_times, cached_times = [], []
        for _ in range(args.rounds):
            times, live_loss = timed_steps(copy.deepcopy(reference).train(), DPOObjective(settings, reference), live_batches)
            live_times += times
            times, cached_loss = timed_steps(copy.deepcopy(reference).train(), DPOObjective(settings), cached_batches)
            cached_times += times
            assert abs(live_loss - cached_loss) < 1e-5, (live_loss, cached_loss)

    live, cached = statistics.median(live_times), statistics.median(cached_times)
    params = sum(p.numel() for p in reference.parameters()) / 1e6
    print(f"{args.preset}: {params:.1f}M params, {args.batch_size} pairs x {args.seq_len} tokens, {len(live_times)} steps/variant")
    print(f"one-time precompute over {len(pairs)} pairs: {precompute_s:.2f} s")
    print(f"step with reference forward : {live * 1000:.0f} ms (median)")
    print(f"step with precomputed logps : {cached * 1000:.0f} ms (median)")
    print(f"speed-up: {live / cached:.2f}x; first-step losses agree within 1e-5")


if __name__ == "__main__":
    main()
