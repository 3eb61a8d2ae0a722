"""Training throughput (forward + backward + AdamW step) of MateConv vs Hugging Face LlamaForCausalLM.

Both models get the same config and the same weights (the Llama one is `model.export.to_llama` of ours) and run the
same batches; timed steps alternate between them so machine noise hits all alike. `--qk_norm` gives our model the
seed presets' per-head q/k RMSNorm: its twin is then `Qwen3ForCausalLM` (`to_qwen3`), and our model without the norm
runs beside them, which measures what the norm costs. MoE configs have no transformers twin, so `--moe` times our MoE
model with its routed experts as grouped GEMMs (`moe_impl grouped`) against the same weights run expert by expert
(`moe_impl loop`, the fallback), and our dense model of the same width.

    python benchmarks/bench_model_train.py --dim 512 --layers 8 --seq 512 --batch 4 --steps 6
"""
from __future__ import annotations

import argparse
import time

import torch

from model import MateConvConfig, MateConvForCausalLM
from model.export import to_llama, to_qwen3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--moe", action="store_true", help="time the MoE model (4 experts, top 2, 1 shared), grouped "
                                                           "GEMM against the loop over experts, and our dense model")
    parser.add_argument("--qk_norm", action="store_true", help="our model with per-head q/k RMSNorm (the seed presets'"
                                                               ") against HF Qwen3 and against itself without it")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our model")
    return parser.parse_args()


def train_step(model, optimizer, input_ids: torch.Tensor, dtype: torch.dtype) -> float:
    with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # forces the step to finish (CUDA sync)


def main() -> None:
    args = parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    fields = dict(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                  vocab_size=args.vocab, max_seq_len=args.seq, qk_norm=args.qk_norm)
    ours = MateConvForCausalLM(MateConvConfig(**fields)).to(device)
    if args.moe:
        grouped = MateConvForCausalLM(MateConvConfig(**fields, use_moe=True, moe_impl="grouped")).to(device)
        looped = MateConvForCausalLM(MateConvConfig(**fields, use_moe=True, moe_impl="loop")).to(device)
        looped.load_state_dict(grouped.state_dict())
        contenders = {"MateConv MoE grouped": grouped, "MateConv MoE loop": looped, "MateConv dense": ours}
    elif args.qk_norm:
        plain = MateConvForCausalLM(MateConvConfig(**{**fields, "qk_norm": False})).to(device)
        plain.load_state_dict(ours.state_dict(), strict=False)  # all but the q/k norms' weights
        contenders = {"MateConv q/k norm": ours, "HF Qwen3": to_qwen3(ours), "MateConv without q/k norm": plain}
    else:
        contenders = {"MateConv": ours, "HF Llama": to_llama(ours)}
    if args.compile:
        twin = MateConvForCausalLM(contenders[next(iter(contenders))].config).to(device)
        contenders[f"{next(iter(contenders))} compiled"] = torch.compile(twin)
    for model in contenders.values():
        model.train()
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
                  for name, model in contenders.items()}
    batches = [torch.randint(3, args.vocab, (args.batch, args.seq), device=device) for _ in range(4)]

    print(f"device {device}, dtype {str(dtype).split('.')[-1]}, dim {args.dim}, layers {args.layers}, "
          f"heads {args.heads}/{args.kv_heads}, seq {args.seq}, batch {args.batch}, torch {torch.__version__}")
    for name, model in contenders.items():
        for step in range(args.warmup):
            train_step(model, optimizers[name], batches[step % len(batches)], dtype)
    seconds = {name: 0.0 for name in contenders}
    for step in range(args.steps):
        for name, model in contenders.items():
            start = time.perf_counter()
            train_step(model, optimizers[name], batches[step % len(batches)], dtype)
            seconds[name] += time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq
    reference = list(contenders)[1]
    print(f"\n| model | params (M) | s/step | tokens/s | vs {reference} |\n| --- | --- | --- | --- | --- |")
    for name, model in contenders.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.1f} | {seconds[name] / args.steps:.3f} | {tokens / seconds[name]:,.0f} | "
              f"{seconds[reference] / seconds[name]:.2f}x |")


if __name__ == "__main__":
    main()
