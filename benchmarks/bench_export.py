"""MateConv-0.02B out to llama.cpp: export time and GGUF size per dtype, and CPU decode speed of llama.cpp
(llama-cpp-python) against our `generate_tokens` on the same weights, side by side in one process.

A randomly initialised MateConv-0.02B (preset, vocab 6400) with MiniMind's 6400-token byte-level BPE from the
shared data (same shape as a trained model; speed and size do not depend on the weights' values). Greedy, batch 1,
a 32-token prompt, `--new_tokens` new tokens with EOS disabled; best of `--repeats`, the two alternating.

    python benchmarks/bench_export.py                  # MATECONV_SHARED_DATA defaults to ../shared/data
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from llama_cpp import Llama
from transformers import AutoTokenizer

from mateconv.chat_format import CHAT_TEMPLATE
from mateconv.export import export_gguf
from model import preset_config
from model.generation import generate_tokens
from model.modeling import MateConvForCausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MATECONV_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKENIZER = SHARED / "jingyaogong__minimind" / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not (TOKENIZER / "tokenizer.json").is_file():
        raise SystemExit(f"bench_export: MiniMind's tokenizer not found under {TOKENIZER} (set MATECONV_SHARED_DATA)")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_export_"))
    model = MateConvForCausalLM(preset_config("mateconv-0.02b", vocab_size=6400)).eval()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(root / "mateconv")
    tokenizer.save_pretrained(root / "mateconv")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"MateConv-0.02B: {params:.1f}M parameters, {args.threads} threads, {args.new_tokens} new tokens")
    print("| GGUF dtype | export s | file MiB | llama.cpp tok/s | ours tok/s | llama.cpp / ours |")
    print("|---|---|---|---|---|---|")
    prompt = list(range(10, 42))
    for dtype in ("f32", "f16", "q8_0"):
        start = time.perf_counter()
        path = export_gguf(root / "mateconv", root / f"gguf-{dtype}", dtype)
        export_s = time.perf_counter() - start
        llm = Llama(model_path=str(path), n_ctx=512, n_threads=args.threads, n_batch=64, verbose=False)

        def llama_cpp() -> None:
            llm.reset()
            for count, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), 1):
                if count == args.new_tokens:
                    break

        def ours() -> None:
            generate_tokens(model, torch.tensor([prompt]), max_new_tokens=args.new_tokens, temperature=0)

        times = {"llama.cpp": [], "ours": []}
        for _ in range(args.repeats):
            for name, fn in (("llama.cpp", llama_cpp), ("ours", ours)):
                start = time.perf_counter()
                with torch.inference_mode():
                    fn()
                times[name].append(time.perf_counter() - start)
        speed = {name: args.new_tokens / min(values) for name, values in times.items()}
        print(f"| {dtype} | {export_s:.1f} | {path.stat().st_size / 2**20:.1f} | {speed['llama.cpp']:.0f} | "
              f"{speed['ours']:.0f} | {speed['llama.cpp'] / speed['ours']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
