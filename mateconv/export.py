"""Export a trained MateConv checkpoint (dense or Mixture-of-Experts) for the rest of the ecosystem, in one command.

    python -m mateconv.export out/sft/final --to llama --out out/export/llama            # transformers, vLLM, lm-eval
    python -m mateconv.export out/sft/final --to gguf --dtype q8_0 --out out/export/gguf  # llama.cpp, ollama

`llama`: a `LlamaForCausalLM` directory (same weights, strict load) with the tokenizer, a chat template that plain
Jinja renders, and a generation_config.json that samples by default (servers that follow it honour temperature).
`qwen3`: the same as a `Qwen3ForCausalLM`, for models trained with `qk_norm` (per-head q/k RMSNorm, which Llama lacks).
`qwen2moe`: a Mixture-of-Experts model as a `Qwen2MoeForCausalLM` (no trust_remote_code; vLLM and llama.cpp know it);
`qwen3moe`: as a `Qwen3MoeForCausalLM`, for MoE models with `qk_norm` and no shared experts; `qwen3next`: as a
`Qwen3NextForCausalLM` of full-attention layers, for those with both (the MoE preset). model/export.py shows how each
computes exactly our function.
`gguf`: one `model-<dtype>.gguf` written with the `gguf` package (llama.cpp's own file-format library) in the
llama.cpp architecture that computes the model's function (gguf_architecture: Llama or Qwen3; an MoE model as
qwen2moe, qwen3moe, bailingmoe or dots1); q/k rows reordered where llama.cpp's rotary layout is not ours, our byte-level
BPE as llama.cpp's "gpt2" tokenizer.
A Hugging Face model (trained from --init_from) needs no export; for its GGUF the one-line refusal names llama.cpp's
convert_hf_to_gguf.py command.
"""
from __future__ import annotations

import json
import os
import re
import sys
from shlex import quote
from pathlib import Path

import gguf
import torch
from transformers import GenerationConfig

from mateconv.chat import ChatError, load_model
from mateconv.files import atomic_dir, temporary_sibling
from mateconv.flags import ArgumentParser
from mateconv.terminal import no_transformers_bars, run_main
from mateconv.tokenizer import SPLIT_PATTERN, save_pretrained_portable
from model import ConfigError, MateConvForCausalLM
from model.export import TO_STANDARD, qwen_moe_state_dict, shared_projections, shared_width, standard_architecture
from model.modeling import SAMPLING_DEFAULTS

DTYPES = {"f32": torch.float32, "f16": torch.float16}
GGUF_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
# llama.cpp's MoE architectures that run our experts as they are: plain shared experts beside the routed ones, the
# router's renormalisation read from the file; rednote's dots1 with per-head q/k norms, inclusionAI's bailingmoe without
OWN_EXPERT_LAYOUT = (gguf.MODEL_ARCH.DOTS1, gguf.MODEL_ARCH.BAILINGMOE)
# llama.cpp rotates pairs of adjacent dimensions in these (its converter reorders their q/k rows), half the head apart
# in the others, as we do
INTERLEAVED_ROTARY = (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.BAILINGMOE)
GGUF_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                   "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked (shown as one line)."""


def plain_chat_template(template: str) -> str:
    """The template without `{% generation %}` markers, a transformers extension that plain Jinja rejects."""
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


def load_mateconv(source: str | Path, gguf_command: str = ""):
    """The MateConv model and tokenizer at `source`. A Hugging Face model (one trained from --init_from) is refused
    with what takes it further: for a GGUF, llama.cpp's converter (`gguf_command`)."""
    try:
        model, tokenizer = load_model(source, device="cpu", dtype="float32", chat=False)
    except ChatError as error:
        raise ExportError(str(error)) from None
    if not isinstance(model, MateConvForCausalLM):
        what = f"{source} holds a Hugging Face {type(model).__name__}, not a MateConv model"
        if gguf_command:
            raise ExportError(f"{what}, so llama.cpp's own converter makes its GGUF: {gguf_command} "
                              "(convert_hf_to_gguf.py: github.com/ggml-org/llama.cpp)")
        raise ExportError(f"{what}: it needs no export (transformers, vLLM and lm-eval load the directory as it is)")
    return model, tokenizer


# Written into each exported model directory: a directory holding it may be replaced by the next export.
EXPORT_MARKER = "mateconv_export.json"


def check_replaceable(out: Path, source: str | Path) -> None:
    """`out` (resolved): an export replaces its --out directory: only one that is new, empty, or an earlier export
    (never the user's checkpoints, data, or the source model)."""
    if out == Path(source).resolve():
        raise ExportError(f"--out {out} is the source model; name another directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, which the export directory would replace; name a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ExportError(f"--out {out} holds files an export did not write, which it would replace; name a new or "
                          "empty directory")


def export_hf_dir(source: str | Path, out: str | Path, dtype: str = "f32", architecture: str = "llama") -> Path:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is for gguf; a {architecture} directory is saved as {' or '.join(DTYPES)}")
    out = Path(out).resolve()
    check_replaceable(out, source)
    model, tokenizer = load_mateconv(source)
    config = model.config
    standard = standard_twin(model, source, architecture)
    with atomic_dir(out) as tmp, no_transformers_bars():
        standard.to(DTYPES[dtype]).save_pretrained(tmp)
        if tokenizer.chat_template:
            tokenizer.chat_template = plain_chat_template(tokenizer.chat_template)
        save_pretrained_portable(tokenizer, tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SAMPLING_DEFAULTS).save_pretrained(tmp)
        # transformers 5 nests rope_theta in rope_parameters; readers of the older layout (transformers 4, vLLM
        # releases before it) would take Llama's default base instead of ours, and Qwen3-Next's default rotary
        # share of the head (0.25) instead of its whole
        saved = json.loads((tmp / "config.json").read_text())
        saved.setdefault("rope_theta", config.rope_theta)
        if "partial_rotary_factor" in saved.get("rope_parameters", {}):
            saved.setdefault("partial_rotary_factor", saved["rope_parameters"]["partial_rotary_factor"])
        (tmp / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        (tmp / EXPORT_MARKER).write_text(json.dumps({"source": str(Path(source).resolve()), "to": architecture,
                                                     "dtype": dtype}) + "\n")
    return out


def standard_twin(model: MateConvForCausalLM, source: str | Path, architecture: str):
    """The standard Hugging Face model `architecture` names, computing what `model` does; ExportError if it cannot."""
    try:
        return TO_STANDARD[architecture](model)
    except ConfigError as error:
        raise ExportError(f"{source}: {error} (--to {standard_architecture(model.config)})") from None


def gguf_architecture(config) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture that computes this model's function. llama.cpp fixes the top-k renormalisation of
    its qwen2moe (never) and qwen3moe (always, and it has no shared experts); other MoE models go as dots1 (q/k norms)
    or bailingmoe (none). Its qwen3next, the Hugging Face export of shared experts with q/k norms, needs its
    linear-attention layers."""
    if not config.use_moe:
        return gguf.MODEL_ARCH.QWEN3 if config.qk_norm else gguf.MODEL_ARCH.LLAMA
    if config.qk_norm:
        qwen3moe = renormalises(config) and not config.n_shared_experts
        return gguf.MODEL_ARCH.QWEN3MOE if qwen3moe else gguf.MODEL_ARCH.DOTS1
    return gguf.MODEL_ARCH.BAILINGMOE if renormalises(config) else gguf.MODEL_ARCH.QWEN2MOE


def gguf_tensors(model: MateConvForCausalLM, source: str | Path, architecture: gguf.MODEL_ARCH):
    """(Hugging Face name, tensor) in the layout llama.cpp's `architecture` reads: a dense model's own tensors, a
    Mixture-of-Experts model's as its Qwen MoE twin holds them (dots1, bailingmoe: our own), under the names of the
    per-expert layout that llama.cpp's converter stacks (each layer's fused expert gate/up split in two)."""
    if not model.config.use_moe:
        yield from model.state_dict().items()
        return
    if architecture in OWN_EXPERT_LAYOUT:
        state = {**qwen_moe_state_dict(model, shared_expert=False), **own_shared_experts(model)}
        if architecture == gguf.MODEL_ARCH.DOTS1:
            for name in [name for name in state if name.endswith(("k_proj.weight", "v_proj.weight"))]:
                state[name] = each_query_head_its_own(state[name], model.config)
    else:
        state = standard_twin(model, source, gguf.MODEL_ARCH_NAMES[architecture]).state_dict()
    for name, tensor in state.items():
        if name.endswith("experts.gate_up_proj"):
            experts = name.removesuffix("gate_up_proj")
            gate, up = tensor.chunk(2, dim=1)
            yield experts + "gate_proj.weight", gate
            yield experts + "up_proj.weight", up
        elif name.endswith("experts.down_proj"):
            yield name + ".weight", tensor
        else:
            yield name, tensor


def own_shared_experts(model: MateConvForCausalLM) -> dict[str, torch.Tensor]:
    """Each layer's shared experts side by side as one SwiGLU (one expert's width of zeros where it has none)."""
    return {f"model.layers.{index}.mlp.shared_experts.{name}.weight": weight
            for index, layer in enumerate(model.model.layers)
            for name, weight in shared_projections(model, layer).items()}


def each_query_head_its_own(weight: torch.Tensor, config) -> torch.Tensor:
    """A key or value projection shared by groups of query heads, repeated for each head of its group: llama.cpp's
    dots1 reads as many key/value heads as query heads (the same function, a larger KV cache)."""
    heads = weight.view(config.n_kv_heads, -1, weight.shape[-1])
    return heads.repeat_interleave(config.n_heads // config.n_kv_heads, dim=0).flatten(0, 1)


def rotary_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our rotary embedding pairs dimension i with i + head_dim/2 in every head; llama.cpp's Llama pairs 2i with
    2i+1. Reordering the q/k projection rows (i, i + half) -> (2i, 2i+1) makes both compute the same attention."""
    rows, columns = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, columns).transpose(1, 2).reshape(rows, columns)


# The Split step of our pre-tokenizer as tokenizer.json writes it
OUR_SPLIT = {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False}


def llama_cpp_split(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: "qwen2" for ours, "gpt-2" for GPT-2's (tokenizers trained
    before ours changed, MiniMind's); any other would split text unlike training in llama.cpp and is refused."""
    if spec.get("normalizer"):
        raise ExportError(f"the tokenizer normalizes text first ({spec['normalizer']['type']}), which llama.cpp does "
                          "not; only byte-level BPE tokenizers without a normalizer export to GGUF")

    def byte_level(step: dict, use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
                and step.get("use_regex", True) == use_regex)

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if byte_level(pre, use_regex=True):
        return "gpt-2"
    if len(steps) == 2 and steps[0] == OUR_SPLIT and byte_level(steps[1], use_regex=False):
        return "qwen2"
    raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is neither GPT-2's nor MateConv's "
                      "split, and llama.cpp would split text otherwise; only those two export to GGUF")


def tokenizer_vocab(spec: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges) of a byte-level BPE tokenizer (its tokenizer.json), padded to
    the embedding rows."""
    if spec["model"]["type"] != "BPE" or spec["model"].get("ignore_merges"):
        raise ExportError(f"only byte-level BPE tokenizers export to GGUF (this one: {spec['model']['type']}"
                          f"{' with ignore_merges' if spec['model'].get('ignore_merges') else ''})")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in spec["model"]["vocab"].items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, [int(t) for t in types], merges


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, bos_token_id: int) -> str:
    """Writes the tokenizer as llama.cpp's "gpt2" BPE with the pre-tokenizer that splits text as ours does, its chat
    template (if it has one) and no BOS added; returns that pre-tokenizer's name."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    split = llama_cpp_split(spec)
    tokens, types, merges = tokenizer_vocab(spec, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(split)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:  # optional in llama.cpp
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:  # a base model's may have none
        writer.add_chat_template(plain_chat_template(tokenizer.chat_template))
    return split


def ollama_note(architecture: gguf.MODEL_ARCH, split: str) -> str | None:
    """ollama runs Qwen3 models (dense and MoE) on its own engine, whose tokenizer splits text as Qwen2 does whatever
    the GGUF says (its Llama models go through llama.cpp, which reads the split from the file)."""
    if architecture in (gguf.MODEL_ARCH.QWEN3, gguf.MODEL_ARCH.QWEN3MOE) and split != "qwen2":
        return (f"note: this tokenizer splits text as {split} does, but ollama's engine for Qwen3 models splits as "
                "qwen2 does, so ollama would give the model other token ids than it trained on (llama.cpp reads the "
                "split from the file and is right); a tokenizer trained by mateconv.tokenizer now fits both")
    return None


def export_gguf(source: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    if dtype not in GGUF_TYPES:
        raise ExportError(f"--dtype must be one of {', '.join(GGUF_TYPES)} for gguf, got {dtype}")
    wanted = Path(out) / f"model-{dtype}.gguf"
    model, tokenizer = load_mateconv(source, f"mkdir -p {quote(str(out))} && python convert_hf_to_gguf.py "
                                             f"{quote(str(source))} --outfile {quote(str(wanted))} --outtype {dtype}")
    config = model.config
    architecture = gguf_architecture(config)
    names = gguf.get_tensor_name_map(architecture, config.n_layers)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"model-{dtype}.gguf"  # the one file an export writes there: other files (a Modelfile) stay
    target = temporary_sibling(final)
    try:
        writer = gguf.GGUFWriter(target, gguf.MODEL_ARCH_NAMES[architecture])
        writer.add_name(Path(source).resolve().parent.name or "mateconv")
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.dim)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.hidden_dim)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_heads if architecture == gguf.MODEL_ARCH.DOTS1 else config.n_kv_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        if config.use_moe:
            add_experts(writer, config, architecture)
        writer.add_file_type(GGUF_FILE_TYPES[dtype])
        note = ollama_note(architecture, add_tokenizer(writer, tokenizer, config.vocab_size, config.bos_token_id))
        if note:
            print(f"export: {note}", file=sys.stderr)
        for name, tensor in gguf_tensors(model, source, architecture):
            if name == "lm_head.weight" and config.tie_word_embeddings and not config.use_moe:
                continue  # llama.cpp's Llama and Qwen3 reuse token_embd when output.weight is absent (its MoE ones not)
            if architecture in INTERLEAVED_ROTARY and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.n_heads if "q_proj" in name else config.n_kv_heads
                tensor = rotary_to_interleaved(tensor, heads)
            data = tensor.detach().float().numpy()
            # norms, biases and the routers (whose scores pick the experts, as llama.cpp's converter keeps them) f32
            router = name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
            kind = GGUF_TYPES[dtype] if data.ndim >= 2 and not router else gguf.GGMLQuantizationType.F32
            packed = gguf.quants.quantize(data, kind)
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), packed, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    os.replace(target, final)
    return final


def renormalises(config) -> bool:
    """Whether the model rescales its top-k expert weights to sum to 1 (one weight alone it never does)."""
    return config.norm_topk_prob and config.num_experts_per_tok > 1


def add_experts(writer: gguf.GGUFWriter, config, architecture: gguf.MODEL_ARCH) -> None:
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.hidden_dim)
    if architecture == gguf.MODEL_ARCH.QWEN2MOE:
        writer.add_expert_shared_feed_forward_length(shared_width(config))
    if architecture in OWN_EXPERT_LAYOUT:
        writer.add_leading_dense_block_count(0)
        writer.add_expert_shared_count(max(config.n_shared_experts, 1))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        writer.add_expert_weights_norm(renormalises(config))
        writer.add_expert_weights_scale(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mateconv.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a MateConv save_pretrained directory (out/sft/final, out/dpo/best, ...)")
    parser.add_argument("--to", required=True, choices=(*TO_STANDARD, "gguf"),
                        help="dense models: qwen3 with qk_norm, else llama; Mixture-of-Experts: qwen2moe without "
                        "qk_norm, with it qwen3moe (no shared experts) or qwen3next; gguf for any of them (the llama.cpp "
                        "architecture that computes the model is chosen)")
    parser.add_argument("--dtype", default=None,
                        help="a Hugging Face directory: f32 (default) or f16; gguf: f32, f16 (default) or q8_0")
    parser.add_argument("--out", required=True, help="output directory: a Hugging Face export replaces it (a new, "
                        "empty or "
                        "earlier export's directory); gguf writes model-<dtype>.gguf into it, beside other files")
    args = parser.parse_args(argv)
    try:
        if args.to in TO_STANDARD:
            written = export_hf_dir(args.source, args.out, args.dtype or "f32", args.to)
        else:
            written = export_gguf(args.source, args.out, args.dtype or "f16")
    except ExportError as error:
        sys.exit(f"export: {error}")
    except OSError as error:  # --out under a file, a full or read-only disk, ...
        sys.exit(f"export: cannot write --out {args.out}: {error.strerror or error}")
    print(f"export: wrote {written}")
    return 0


if __name__ == "__main__":
    run_main(main)
