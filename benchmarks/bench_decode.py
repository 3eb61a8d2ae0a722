"""Decode throughput: `model.generation.generate_tokens` (our fixed-shape KV-cache step) vs `transformers` `generate`.

Both run the same weights: a random MateConv model and its `LlamaForCausalLM` export (`model.export.to_llama`).
Greedy, a fixed number of new tokens (EOS disabled), fp32. Both must produce the same tokens. Our decode step is
compiled with `--compile` (auto: on CUDA, as CUDA graphs; the compiling first run is the warm-up, not timed).
Decode tokens/s = batch * new_tokens / (time to generate - time for the prompt forward alone), best of --repeats.

    python benchmarks/bench_decode.py                      # dim 512, 8 layers, batch 1 and 8
    python benchmarks/bench_decode.py --device cuda --batch_sizes 1 8 32
"""
from __future__ import annotations

import argparse
import time

import torch

from mateconv.config import auto_switch


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_of_interleaved(repeats: int, fns: list, device: torch.device) -> list[float]:
    """Best time of each function, alternating them so that load from other processes hits both alike."""
    times = [[timed(fn, device) for fn in fns] for _ in range(repeats)]
    return [min(column) for column in zip(*times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", type=auto_switch, default=None, metavar="auto|1|0",
                        help="compile our decode step (auto: on CUDA)")
    args = parser.parse_args()

    from model import MateConvConfig, MateConvForCausalLM
    from model.export import to_llama
    from model.generation import generate_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compiled = args.compile if args.compile is not None else device.type == "cuda"
    torch.manual_seed(0)
    config = MateConvConfig(dim=args.dim, n_layers=args.n_layers, vocab_size=args.vocab_size,
                            max_seq_len=args.prompt_len + args.new_tokens)
    ours = MateConvForCausalLM(config).to(device).eval()
    llama = to_llama(ours).to(device).eval()
    llama.generation_config.eos_token_id = None
    llama.generation_config.pad_token_id = 0
    print(f"model: dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params; device {device}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_len}, new tokens {args.new_tokens}, greedy; "
          f"our decode step {'compiled' if compiled else 'eager'}")

    rows = []
    for batch in args.batch_sizes:
        prompt = torch.randint(3, args.vocab_size, (batch, args.prompt_len), device=device)

        def run_ours():
            return generate_tokens(ours, prompt, max_new_tokens=args.new_tokens, temperature=0.0, eos_token_id=None,
                                   compile=compiled)

        def run_hf():
            return llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False)

        def prefill():
            ours(input_ids=prompt, use_cache=True)

        with torch.inference_mode():
            ours_tokens, hf_tokens = run_ours(), run_hf()  # also the warm-up
            same = torch.equal(ours_tokens[:, -args.new_tokens:].cpu(), hf_tokens[:, -args.new_tokens:].cpu())
            prefill_s, ours_s, hf_s = best_of_interleaved(args.repeats, [prefill, run_ours, run_hf], device)
        decoded = batch * args.new_tokens
        ours_tps, hf_tps = decoded / max(ours_s - prefill_s, 1e-9), decoded / max(hf_s - prefill_s, 1e-9)
        rows.append((batch, ours_tps, hf_tps, ours_tps / hf_tps, same))
        print(f"batch {batch}: ours {ours_tps:8.1f} tok/s ({ours_s:.3f} s), transformers generate {hf_tps:8.1f} tok/s "
              f"({hf_s:.3f} s), speedup x{ours_tps / hf_tps:.2f}, same tokens: {same}", flush=True)

    print("\n| batch | ours (tok/s) | transformers generate (tok/s) | speedup | same greedy tokens |")
    print("| --- | --- | --- | --- | --- |")
    for batch, ours_tps, hf_tps, ratio, same in rows:
        print(f"| {batch} | {ours_tps:.1f} | {hf_tps:.1f} | x{ratio:.2f} | {same} |")


if __name__ == "__main__":
    main()
