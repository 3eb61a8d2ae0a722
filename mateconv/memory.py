"""GPU memory estimate for training a MateConv model, and the presets in configs/memory/*.yaml.

Per GPU: static bytes per parameter (weights, gradients, fp32 master weights and Adam moments, divided by ZeRO)
plus activations saved for backward per token (counted for this architecture's ops, see docs/operations.md)
plus a fixed framework overhead (CUDA context, cuBLAS/NCCL workspaces).

    python -m mateconv.memory configs/memory/gpu16gb.yaml                     # estimate table for every entry
    python -m mateconv.memory configs/memory/gpu16gb.yaml --flags mateconv-0.1b-moe pretrain
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mateconv.files import load_yaml_mapping, yaml_error
from mateconv.flags import ArgumentParser, render_flags
from mateconv.terminal import run_main
from model.config import MateConvConfig, preset_config

GIB = 1024 ** 3
FRAMEWORK_OVERHEAD = 1.0 * GIB  # CUDA context + cuBLAS/NCCL workspaces, measured ~0.6-1 GiB on recent drivers
FRAGMENTATION = 1.10  # caching-allocator slack on top of the live activation bytes
SAFETY = 0.85  # a preset must estimate at most this fraction of the card
STAGES = ("pretrain", "sft", "dpo")
SETUP_KEYS = ("batch_size", "accumulation_steps", "max_seq_len", "gradient_checkpointing", "zero_stage",
              "offload_optimizer", "num_gpus")


class PresetError(ValueError):
    """A memory preset file that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class TrainingSetup:
    batch_size: int  # micro batch per GPU (examples)
    max_seq_len: int
    gradient_checkpointing: bool = False
    zero_stage: int = 0  # 0 = no partitioning (also plain PyTorch / DDP)
    offload_optimizer: bool = False  # ZeRO-Offload: fp32 master weights + Adam moments live in CPU RAM
    num_gpus: int = 1
    mixed_precision: bool = True  # bf16/fp16 activations; False = fp32 everything (CPU, old GPUs)
    sequences_per_example: int = 1  # 2 for DPO (chosen + rejected)
    reference_model: bool = False  # DPO: a frozen reference copy on the GPU


def out_of_memory_figures(error: Exception) -> str:
    """torch's out-of-memory message in brief: the allocation that failed and the card's free and total memory."""
    text = str(error)
    figures = [found.group(0) for pattern in (r"Tried to allocate [\d.]+ \w+",
                                              r"total capacity of [\d.]+ \w+ of which [\d.]+ \w+ is free")
               if (found := re.search(pattern, text))]
    return "; ".join(figures) or text.splitlines()[0]


def count_parameters(config: MateConvConfig) -> int:
    """Trainable parameters of MateConvForCausalLM (tied embeddings counted once)."""
    d, f, kv = config.dim, config.hidden_dim, config.n_kv_heads * config.head_dim
    attention = 2 * d * d + 2 * d * kv
    swiglu = 3 * d * f
    if config.use_moe:
        ffn = (config.n_routed_experts + config.n_shared_experts) * swiglu + d * config.n_routed_experts
    else:
        ffn = swiglu
    qk_norms = 2 * config.head_dim if config.qk_norm else 0
    per_layer = attention + ffn + 2 * d + qk_norms
    embeddings = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.n_layers * per_layer + d


def layer_activation_bytes(config: MateConvConfig, act: int) -> int:
    """Bytes one decoder layer saves for backward per token. `act` = bytes per activation element."""
    d, f, kv = config.dim, config.hidden_dim, config.n_kv_heads * config.head_dim
    # RMSNorm keeps its fp32 input and the normalised output; the projection after it keeps its input.
    norm_and_proj_input = 4 * d + 2 * act * d
    # SDPA keeps q, k, v and its output; o_proj keeps its (reshaped) input.
    attention = norm_and_proj_input + act * (d + 2 * kv + d) + act * d
    if config.qk_norm:  # each q/k norm keeps its input in fp32 (and in act when that is narrower) and 1/rms per head
        attention += (d + kv) * (4 + (act if act < 4 else 0)) + 4 * (config.n_heads + config.n_kv_heads)
    # SwiGLU keeps gate, silu(gate), up and their product.
    swiglu = 4 * act * f
    if not config.use_moe:
        return attention + norm_and_proj_input + swiglu
    k, experts = config.num_experts_per_tok, config.n_routed_experts
    router = 4 * experts + 12 * k  # fp32 softmax scores, top-k weights and indices
    routed = k * (act * d + swiglu + act * d)  # gathered token copy, expert internals, expert output
    shared = config.n_shared_experts * swiglu
    return attention + norm_and_proj_input + router + routed + shared


def head_saved_bytes(config: MateConvConfig, act: int) -> int:
    """Bytes the final norm, lm_head and loss save for backward per token: norm input/output, lm_head input and
    the fp32 log-softmax of the logits."""
    return 4 * config.dim + 2 * act * config.dim + 4 * config.vocab_size


def head_peak_bytes(config: MateConvConfig, act: int) -> int:
    """Saved bytes plus what is live at the peak: the logits returned in the model dtype and, in backward, the
    fp32 logits gradient (and its cast back to the model dtype)."""
    vocab = config.vocab_size
    return head_saved_bytes(config, act) + act * vocab + 4 * vocab + (act * vocab if act != 4 else 0)


def activation_bytes_per_token(config: MateConvConfig, setup: TrainingSetup) -> int:
    act = 2 if setup.mixed_precision else 4
    layer = layer_activation_bytes(config, act)
    if setup.gradient_checkpointing:
        # each layer keeps only its input; one layer's activations are rebuilt at a time during backward
        layers = config.n_layers * act * config.dim + layer
    else:
        layers = config.n_layers * layer
    return layers + head_peak_bytes(config, act)


def estimate(config: MateConvConfig, setup: TrainingSetup) -> dict[str, float]:
    """Bytes per GPU by component, and their `total`."""
    params = count_parameters(config)
    shards = setup.num_gpus if setup.num_gpus > 1 else 1
    if setup.mixed_precision:
        weights, grads, states = 2 * params, 2 * params, 12 * params  # bf16 weights and grads; fp32 master + m + v
    else:
        weights, grads, states = 4 * params, 4 * params, 8 * params  # fp32 weights, grads, m + v
    if setup.zero_stage >= 1:
        states /= shards
    if setup.zero_stage >= 2:
        grads /= shards
    if setup.zero_stage >= 3:
        weights /= shards
    if setup.offload_optimizer:
        states = 0.0
    reference = (2 if setup.mixed_precision else 4) * params if setup.reference_model else 0
    tokens = setup.batch_size * setup.max_seq_len * setup.sequences_per_example
    activations = tokens * activation_bytes_per_token(config, setup) * FRAGMENTATION
    parts = {"weights": weights, "gradients": grads, "optimizer_states": states, "reference_model": reference,
             "activations": activations, "framework": FRAMEWORK_OVERHEAD}
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------------- presets

def load_presets(path: str | Path) -> dict:
    """Reads a configs/memory/*.yaml file: `{gpu_memory_gb, num_gpus, models: {preset: {stage: {setup keys}}}}`."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"memory preset file not found: {path}")
    try:
        data = load_yaml_mapping(path.read_text())
    except yaml.YAMLError as e:
        raise PresetError(yaml_error(path, e)) from None
    if not isinstance(data, dict) or not isinstance(data.get("gpu_memory_gb"), (int, float)) \
            or not isinstance(data.get("models"), dict):
        raise PresetError(f"{path}: expected gpu_memory_gb (number) and models (mapping)")
    for model_name, stages in data["models"].items():
        if not isinstance(stages, dict):
            raise PresetError(f"{path}: models.{model_name} must map stages ({', '.join(STAGES)}) to settings")
        for stage, settings in stages.items():
            if stage not in STAGES:
                raise PresetError(f"{path}: models.{model_name}: unknown stage '{stage}' ({', '.join(STAGES)})")
            unknown = set(settings) - set(SETUP_KEYS)
            if unknown:
                raise PresetError(f"{path}: models.{model_name}.{stage}: unknown keys {sorted(unknown)} "
                                   f"(known: {', '.join(SETUP_KEYS)})")
    return data


def setup_for(data: dict, model_name: str, stage: str) -> TrainingSetup:
    settings = dict(data["models"][model_name][stage])
    settings.pop("accumulation_steps", None)
    settings.setdefault("num_gpus", data.get("num_gpus", 1))
    dpo = stage == "dpo"
    return TrainingSetup(**settings, sequences_per_example=2 if dpo else 1, reference_model=dpo)


def preset_flags(data: dict, model_name: str, stage: str) -> list[str]:
    """The preset as training flags (`--key value`), the model size as `--preset`."""
    settings = {k: v for k, v in data["models"][model_name][stage].items() if k != "num_gpus"}
    return render_flags({"preset": model_name, **settings})


def report(path: str | Path) -> str:
    data = load_presets(path)
    budget = data["gpu_memory_gb"] * GIB
    lines = [f"{Path(path).name}: {data['gpu_memory_gb']} GB per GPU, a preset may use {SAFETY:.0%}",
             f"{'model':<20}{'stage':<10}{'tokens':>8}{'weights+grads+optim':>21}{'activations':>13}"
             f"{'total':>9}{'of card':>9}"]
    for model_name, stages in data["models"].items():
        config = preset_config(model_name, max_seq_len=max(s["max_seq_len"] for s in stages.values()))
        for stage in stages:
            setup = setup_for(data, model_name, stage)
            parts = estimate(config, setup)
            static = parts["weights"] + parts["gradients"] + parts["optimizer_states"] + parts["reference_model"]
            tokens = setup.batch_size * setup.max_seq_len * setup.sequences_per_example
            lines.append(f"{model_name:<20}{stage:<10}{tokens:>8}{static / GIB:>19.2f} G"
                         f"{parts['activations'] / GIB:>11.2f} G{parts['total'] / GIB:>7.2f} G"
                         f"{parts['total'] / budget:>9.0%}")
    return "\n".join(lines)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset_file", help="configs/memory/gpu16gb.yaml, ...")
    parser.add_argument("--flags", nargs=2, metavar=("MODEL", "STAGE"), help="print the training flags of one entry")
    args = parser.parse_args()
    try:
        if args.flags:
            data = load_presets(args.preset_file)
            model_name, stage = args.flags
            if stage not in data["models"].get(model_name, {}):
                raise PresetError(f"{args.preset_file} has no entry {model_name}/{stage}; entries: " + ", ".join(
                    f"{m}/{s}" for m, stages in data["models"].items() for s in stages))
            print(" ".join(preset_flags(data, model_name, stage)))
        else:
            print(report(args.preset_file))
    except PresetError as e:
        sys.exit(f"memory: {e}")


if __name__ == "__main__":
    run_main(main)
