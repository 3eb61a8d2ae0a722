"""Training throughput (tokens/s, MFU) of the stage-4 engine: MateConv-0.02B dense, its Hugging Face twin (the
preset's per-head q/k norm makes it a `Qwen3ForCausalLM`, `model.export.to_qwen3`; same weights) and the MoE preset,
all run by the same Trainer with the same settings (AdamW, fp32 on CPU / auto precision on GPU, same batches), in one
process.

    python benchmarks/bench_pretrain.py --seq 128 --batch 4 --steps 5 --rounds 2
    python benchmarks/bench_pretrain.py --seq 512 --batch 64 --steps 30 --warmup 10 --rounds 1 --compile 0 1  # GPU
`--compile 0 1` runs every contender eager and compiled (the engine's `--compile`); `--mask_variants` instead runs
the compiled MateConv models three ways: packed rows' document mask as a boolean SDPA mask (the default), as a
FlexAttention block mask (the model's `flex_attention`, picked on CUDA only), and with no document mask at all
(`document_mask false`: plain causal attention across the row, the kernel MiniMind's one-document rows run, so the
bound a mask kernel can reach); `--tiny` shrinks the models to dim 64, 2 layers (a wiring check,
benchmarks/gpu_check.sh --cpu-smoke).
`--profile N` instead runs one model (`--profile_model`: MateConv-0.02B dense or the 0.1B MoE; eager, or compiled
with `--compile 1`) under torch.profiler and reports where the last N of the
--steps steps spent their time: the top operators on the device (GPU) and on the host, and on GPU how much of each
step's wall time the device was busy, which tells a starved GPU (host-bound: launches, syncs) from a kernel-bound one;
`--trace FILE` also writes the Chrome trace (open it in ui.perfetto.dev).
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
import time
import traceback
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.utils.data import Dataset

from mateconv.config import TrainConfig, build_config
from mateconv.files import read_metrics
from mateconv.train.distributed import setup
from mateconv.train.engine import Trainer, seed_everything
from mateconv.train.objectives import LMObjective
from mateconv.train.tracking import active_parameters
from model import MateConvForCausalLM, preset_config
from model.export import to_llama, to_qwen3

DENSE = "MateConv-0.02B dense"
# how packed rows' documents are kept apart: model config changes by label ("" is the model as configured)
MASK_VARIANTS = {"": {}, "flex attention": {"flex_attention": True}, "no document mask": {"document_mask": False}}


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


class ProfiledTrainer(Trainer):
    """The engine, telling the profiler's schedule where each optimizer step ends (and when)."""

    def __init__(self, *args, profiler: torch.profiler.profile, **kwargs):
        super().__init__(*args, **kwargs)
        self.profiler, self.step_ends = profiler, []

    def optimizer_step(self, loss: torch.Tensor):
        result = super().optimizer_step(loss)
        # no device sync here: the host runs at most one step ahead of the device (the engine reads a step's figures
        # once the next one is queued), so over many steps the wall time per step is the device's
        self.step_ends.append(time.perf_counter())
        self.profiler.step()
        return result


def top_operators(events, attribute: str, total: float, per_step: int, rows: int) -> str:
    """A markdown table of the operators with the most self time (`attribute`, in microseconds, of `total`)."""
    lines = ["| operator | calls / step | ms / step | share |", "| --- | --- | --- | --- |"]
    for event in sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:rows]:
        spent = getattr(event, attribute)
        lines.append(f"| {event.key[:70]} | {event.count / per_step:.0f} | {spent / 1e3 / per_step:.2f} "
                     f"| {spent / max(total, 1e-9):.1%} |")
    return "\n".join(lines)


def profile(name: str, model: torch.nn.Module, config: TrainConfig, data: Dataset, steps: int, trace: str) -> None:
    """Runs the engine over config's steps and profiles the last `steps` of them."""
    runtime = setup(config.parallel)
    cuda = runtime.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=config.optim.max_steps - steps - 1, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
        trainer = ProfiledTrainer(config, runtime, model, LMObjective(), data, profiler=profiler)
        trainer.fit()
    wall_ms = (trainer.step_ends[-1] - trainer.step_ends[-steps - 1]) * 1e3 / steps
    events = profiler.key_averages()
    operators = [e for e in events if e.device_type == DeviceType.CPU]  # with the device time of their own kernels
    mode = "compiled" if config.parallel.compiles(runtime.device) else "eager"
    print(f"profile of {name}, {mode}, on {runtime.device}: the last {steps} of {config.optim.max_steps} "
          f"steps, {wall_ms:.1f} ms per step (wall), torch {torch.__version__}\n")
    if cuda:
        busy = sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation)  # kernels and copies
        print(f"device busy {busy / 1e3 / steps:.1f} ms per step: {busy / 1e3 / steps / wall_ms:.0%} of the wall "
              f"time\n")
        print("On the device, by the operator that launched the work:\n\n"
              + top_operators(operators, "self_device_time_total", busy, steps, 15) + "\n")
    host = sum(e.self_cpu_time_total for e in operators)
    print("On the host (ProfilerStep*: time outside any operator, i.e. Python and the engine's own code):\n\n"
          + top_operators(operators, "self_cpu_time_total", host, steps, 15))
    if trace:
        profiler.export_chrome_trace(trace)
        print(f"\nChrome trace: {trace}")


def run(name: str, model: torch.nn.Module, config: TrainConfig, data: Dataset, warmup: int) -> dict:
    runtime = setup(config.parallel)
    Trainer(config, runtime, model, LMObjective(), data).fit()
    rows = read_metrics(Path(config.checkpoint.out_dir) / "metrics.jsonl")
    timed = [r for r in rows if "tokens_per_sec" in r and r["step"] > warmup]
    tokens_per_sec = sum(r["tokens_per_sec"] for r in timed) / len(timed)
    mfu = sum(r["mfu"] for r in timed) / len(timed) if "mfu" in timed[0] else float("nan")
    return {"name": name, "params": sum(p.numel() for p in model.parameters()) / 1e6,
            "active": active_parameters(model) / 1e6, "tokens_per_sec": tokens_per_sec, "mfu": mfu}


def engine_config(args, out_dir: str, compiled: bool) -> TrainConfig:
    return build_config(dict(max_seq_len=args.seq, batch_size=args.batch, max_steps=args.steps, dtype=args.dtype,
                             tracker="none", num_workers=0, log_interval=1, out_dir=out_dir, save_interval_steps=10**9,
                             resume="never", warmup_iters=0, compile=compiled).items())


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
    parser.add_argument("--mask_variants", action="store_true",
                        help="instead of the comparison: the compiled MateConv models with the document mask as SDPA's "
                             "boolean mask, as FlexAttention (CUDA only) and without the mask (plain causal)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="instead of the comparison: profile the last N of --steps steps of one model")
    parser.add_argument("--profile_model", choices=["dense", "moe"], default="dense",
                        help="with --profile: MateConv-0.02B dense or the 0.1B MoE (compiled if --compile 1)")
    parser.add_argument("--trace", default="", help="with --profile: write the Chrome trace to this file")
    args = parser.parse_args()
    if args.profile and not 0 < args.profile < args.steps:
        raise SystemExit(f"bench: --profile {args.profile} must be between 1 and --steps - 1 ({args.steps - 1})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = RandomTokens(args.batch * args.steps, args.seq, 6400)
    seed_everything(0)
    tiny = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2) if args.tiny else {}
    dense = MateConvForCausalLM(preset_config("mateconv-0.02b", max_seq_len=args.seq, **tiny))
    seed_everything(0)
    moe = MateConvForCausalLM(preset_config("mateconv-0.1b-moe", max_seq_len=args.seq, **tiny))
    if args.profile:
        name, model = {"dense": (DENSE, dense), "moe": ("MateConv-0.1B MoE", moe)}[args.profile_model]
        with tempfile.TemporaryDirectory() as tmp:
            profile(name, model, engine_config(args, tmp, compiled=bool(args.compile[0])), data, args.profile,
                    args.trace)
        return
    # the transformers class of the same architecture: Qwen3 for the preset's per-head q/k norm, else Llama
    twin, to_twin = ("Qwen3ForCausalLM", to_qwen3) if dense.config.qk_norm else ("LlamaForCausalLM", to_llama)
    contenders = {DENSE: dense, f"HF {twin} (same weights)": to_twin(dense), "MateConv-0.1B MoE": moe}
    # (name, compiled, variant of MASK_VARIANTS); --mask_variants: the compiled MateConv models each way
    if args.mask_variants:
        runs = [(name, 1, variant) for name in (DENSE, "MateConv-0.1B MoE") for variant in MASK_VARIANTS]
    else:
        runs = [(name, compiled, "") for name, compiled in itertools.product(contenders, args.compile)]
    initial = {name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in contenders.items()}
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for index, (name, compiled, variant) in enumerate(runs):
                model = contenders[name]
                model.load_state_dict(initial[name])
                config = engine_config(args, f"{tmp}/{index}_{round_index}", bool(compiled))
                how = f"{', compiled' if compiled else ''}{f', {variant}' if variant else ''}"
                label = name + how
                try:  # one contender failing (a compile error on a new GPU stack, say) leaves the others' figures
                    if compiled:  # the engine compiles in place: a compiled run gets its own copy
                        model = copy.deepcopy(model)
                        for key, value in MASK_VARIANTS[variant].items():
                            setattr(model.config, key, value)
                    result = {**run(label, model, config, data, args.warmup), "mode": how}
                except Exception as error:  # noqa: BLE001 - reported in the table, traceback in the log
                    traceback.print_exc()
                    best.setdefault(label, {"name": label, "error": f"{type(error).__name__}: {error}"})
                    continue
                print(f"{label}: {result['tokens_per_sec']:,.0f} tokens/s, MFU {result['mfu']:.1%}", flush=True)
                if "tokens_per_sec" not in best.get(label, {}) or \
                        result["tokens_per_sec"] > best[label]["tokens_per_sec"]:
                    best[label] = result
    print(f"\ndevice {device} ({torch.get_num_threads()} threads), seq {args.seq}, batch {args.batch}, "
          f"{args.steps - args.warmup} timed steps, best of {args.rounds} rounds, torch {torch.__version__}\n")
    print(results_table(list(best.values())))
    if any("error" in r for r in best.values()):
        raise SystemExit("bench: a contender failed (see the table and the traceback above)")


def results_table(results: list[dict]) -> str:
    """One row per contender; "vs HF" against the first HF row, "vs dense" against MateConv-0.02B dense run
    the same way (eager, compiled, each mask variant), the figure the MoE's speed target is stated in."""
    done = [r for r in results if "error" not in r]
    references = [r["tokens_per_sec"] for r in done if r["name"].startswith("HF")]
    dense = {r["mode"]: r["tokens_per_sec"] for r in done if r["name"].startswith(DENSE)}
    lines = ["| model | params (M) | active (M) | tokens/s | MFU | vs HF | vs dense |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | | | failed: {r['error'][:120].replace('|', '/')} | | | |")
            continue
        ratio = f"{r['tokens_per_sec'] / references[0]:.2f}x" if references else "n/a"
        same_mode = dense.get(r["mode"])
        vs_dense = f"{r['tokens_per_sec'] / same_mode:.2f}x" if same_mode else "n/a"
        lines.append(f"| {r['name']} | {r['params']:.1f} | {r['active']:.1f} | {r['tokens_per_sec']:,.0f} | "
                     f"{r['mfu']:.1%} | {ratio} | {vs_dense} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
