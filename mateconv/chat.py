"""Streaming chat with a saved model: an interactive multi-turn loop in the terminal, or one reply to a single prompt.

    python scripts/chat.py --model_path out/sft/final                      # interactive, /reset and /exit
    python scripts/chat.py --model_path out/sft/final --prompt "Hi there"  # one reply
    echo "Hi there" | python scripts/chat.py --model_path out/sft/final --prompt -   # one reply, prompt from stdin

Loading, prompt building and streaming live here; `mateconv.serve` and `mateconv.evaluate` reuse them.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from mateconv.config import ConfigError, add_decode_flags, switch
from mateconv.flags import ArgumentParser, format_value
from mateconv.errors import InputError
from mateconv.terminal import no_transformers_bars, run_main
from mateconv.train.distributed import resolve_device as training_device
from mateconv.train.models import model_dir
from model.generation import stream_text  # importing `model` registers MateConv with the Auto classes


class ChatError(InputError, RuntimeError):
    """A problem the user can fix (missing model, bad flag); shown as one line."""


DEFAULT_NEW_TOKENS = 256


@dataclass
class SamplingOptions:
    max_new_tokens: int | None = None  # None: up to DEFAULT_NEW_TOKENS, as many as the context leaves
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    compile: bool | None = None  # torch.compile the decode step; None: on CUDA yes, on CPU no

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ChatError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ChatError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ChatError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ChatError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def resolve_device(device: str) -> torch.device:
    try:
        return training_device(device, local_rank=0)
    except ConfigError as error:  # seed 000's `--device cuda:0` on a machine without that GPU
        raise ChatError(str(error)) from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPUs have no fast bf16 matmuls
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ChatError(f"dtype must be auto or one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


# The files a Hugging Face tokenizer is read from (a fast one's, a slow BPE one's, a SentencePiece one's)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_model(model_path: str | Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
               chat: bool = True):
    """A saved Hugging Face directory (MateConv or any causal LM), or a training checkpoint (consolidated first) ->
    (model in eval mode, tokenizer). Code the checkpoint ships (auto_map) runs only with `trust_remote_code`; without
    it loading such a model fails instead of asking on stdin. For `chat` the tokenizer must have a chat template."""
    try:
        path = model_dir(model_path)
    except ConfigError as error:  # a checkpoint whose run started from a model that is gone
        raise ChatError(f"cannot consolidate the checkpoint {model_path}: {error}") from None
    if not (path / "config.json").is_file():
        raise ChatError(f"no model at {path} (expected a save_pretrained directory with config.json, or a training "
                        "checkpoint: checkpoints/step_N)")
    torch_device = resolve_device(device)
    try:
        with no_transformers_bars():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, torch_device),
                                                         trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as error:  # the last: a weights file cut short or damaged
        if not any((path / name).is_file() for name in TOKENIZER_FILES):  # transformers' words for it mislead
            raise ChatError(f"no tokenizer in {path} (tokenizer.json, tokenizer_config.json, ...): copy there the "
                            "tokenizer the model was trained with, e.g. the files of out/tokenizer") from None
        raise ChatError(f"cannot load model/tokenizer from {path}: {str(error).splitlines()[0]}") from error
    if chat and tokenizer.chat_template is None:
        raise ChatError(f"the tokenizer in {path} has no chat template")
    return model.to(torch_device).eval(), tokenizer


def context_length(model) -> int:
    config = model.config
    for name in ("max_seq_len", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ChatError("the model config names no context length (max_seq_len / max_position_embeddings)")


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Chat-template token ids for `messages`, ending with the assistant generation prompt."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def completion_ids(tokenizer, text: str) -> list[int]:
    """A pretrained model's prompt: `text` as the start of a document, after the end-of-document token that ends each
    document in pretraining (stage 3 packs `doc tokens + [eos]`), with no chat template."""
    lead = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return lead + tokenizer.encode(text, add_special_tokens=False)


def fit_history(tokenizer, messages: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """Drop the oldest user/assistant turns (never the system prompt or the last user turn) until the prompt fits."""
    system = [m for m in messages if m["role"] == "system"][:1]
    turns = [m for m in messages if m["role"] != "system"]
    while len(turns) > 1 and len(prompt_ids(tokenizer, system + turns)) > budget:
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
    return system + turns


def check_utf8(text: str, what: str) -> None:
    """A ChatError for text that holds bytes that were not UTF-8 (a GBK terminal or piped file): Python keeps them as
    lone surrogates, which the tokenizer cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatError(f"{what} is not UTF-8 text: set the terminal to UTF-8, or convert the file "
                        "(from GBK: `iconv -f GBK -t UTF-8 FILE`)") from None


def stream_reply(model, tokenizer, messages: list[dict[str, str]], options: SamplingOptions,
                 completion: bool = False) -> Iterator[str]:
    """Text pieces of the assistant's reply to `messages`, as they are generated; with `completion`, of the
    continuation of the last message's text (`completion_ids`)."""
    context, wanted = context_length(model), options.max_new_tokens
    # By default the reply may take what the context leaves, up to DEFAULT_NEW_TOKENS; a chat's history is cut to
    # leave it at least that much, or half of a short context.
    budget = context - (wanted or min(DEFAULT_NEW_TOKENS, context // 2))
    if budget < 1:
        raise ChatError(f"max_new_tokens {wanted} leaves no room for a prompt in the context of {context} tokens")
    ids = (completion_ids(tokenizer, messages[-1]["content"]) if completion
           else prompt_ids(tokenizer, fit_history(tokenizer, messages, budget)))
    most = context - (wanted or 1)
    if len(ids) > most:
        raise ChatError(f"the prompt is {len(ids)} tokens; at most {most} fit in the context of {context} tokens"
                        + (f" with max_new_tokens {wanted}" if wanted else ""))
    generator = None
    if options.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(options.seed)
    input_ids = torch.tensor([ids], device=model.device)
    yield from stream_text(
        model, tokenizer, input_ids, max_new_tokens=wanted or min(DEFAULT_NEW_TOKENS, context - len(ids)),
        temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
        repetition_penalty=options.repetition_penalty, generator=generator, compile=options.compile,
    )


class ChatSession:
    """A multi-turn conversation: keeps the history and streams each reply into `out`. With `completion` (a
    pretrained model) each line is a text to continue, on its own: no template, no history."""

    def __init__(self, model, tokenizer, options: SamplingOptions, system: str | None = None,
                 completion: bool = False):
        self.model, self.tokenizer, self.options, self.system = model, tokenizer, options, system
        self.completion = completion
        if system:
            check_utf8(system, "the system prompt")
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str, out: TextIO) -> str:
        """Streams the reply to `user_text` into `out`; on Ctrl-C the turn is dropped from the history."""
        check_utf8(user_text, "the message")
        if self.completion:
            self.reset()
        self.messages.append({"role": "user", "content": user_text})
        pieces = []
        try:
            for piece in stream_reply(self.model, self.tokenizer, self.messages, self.options, self.completion):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except BaseException:
            self.messages.pop()
            raise
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})
        return text


def run_interactive(session: ChatSession, inp: TextIO, out: TextIO) -> None:
    out.write("MateConv chat. Commands: /reset (new conversation), /exit (quit); Ctrl-C stops a reply.\n")
    while True:
        out.write("\n>>> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        try:
            session.reply(text, out)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            out.write(" (interrupted)")
        except ChatError as error:  # e.g. a message longer than the context: say so and carry on
            out.write(f"(error: {error})")
        out.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Chat with a saved MateConv (or any Hugging Face causal LM) model.")
    parser.add_argument("--model_path", default="out/sft/final", help="save_pretrained directory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    mode = parser.add_argument_group("mode")
    mode.add_argument("--prompt", default=None, help="answer this one prompt and exit ('-' reads it from stdin)")
    mode.add_argument("--system", default=None, help="system prompt for every conversation")
    mode.add_argument("--text_completion", action="store_true",
                      help="continue each text as written, without the chat template or history (a pretrained model)")
    sampling = parser.add_argument_group("sampling")
    defaults = SamplingOptions()
    sampling.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens,
                          help=f"default: as many as the context leaves, at most {DEFAULT_NEW_TOKENS}")
    sampling.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    sampling.add_argument("--top_p", type=float, default=defaults.top_p)
    sampling.add_argument("--top_k", type=int, default=defaults.top_k, help="0 = off")
    sampling.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    sampling.add_argument("--seed", type=int, default=None)
    add_decode_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                  args.repetition_penalty, args.seed, args.compile)
        model, tokenizer = load_model(args.model_path, args.device, args.dtype)
        session = ChatSession(model, tokenizer, options, args.system, args.text_completion)
        if args.prompt is not None:
            prompt = sys.stdin.read().strip() if args.prompt == "-" else args.prompt
            if not prompt:
                raise ChatError("empty prompt")
            session.reply(prompt, sys.stdout)
            sys.stdout.write("\n")
        else:
            # Started from a script or any non-interactive shell, SIGINT arrives ignored and Python keeps it so:
            # `kill -2` would not stop a reply. Ctrl-C / SIGINT stops the reply wherever the chat was started from.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            run_interactive(session, sys.stdin, sys.stdout)
    except ChatError as error:
        raise SystemExit(f"chat: {error}") from None
    except KeyboardInterrupt:
        sys.stdout.write("\n")


# Seed 000's `eval_model.py --model_mode N`: which stage's final model it chats with.
SEED_MODEL_MODES = {0: "pretrain", 1: "sft", 2: "dpo"}


def add_seed_shape_flags(parser: argparse.ArgumentParser) -> None:
    """The seeds' (and MiniMind's) flags that picked a checkpoint file by the model's shape: `--dim`, `--n_layers`,
    `--use_moe [1|0]`."""
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--n_layers", type=int, default=None)
    parser.add_argument("--use_moe", type=switch, nargs="?", const=True, default=None, metavar="1|0")


def check_seed_shape(path: Path, args: argparse.Namespace, program: str) -> None:
    """The seeds' `--dim`/`--n_layers`/`--use_moe` picked a checkpoint file by shape; here a model directory holds its
    own shape, which they must match (SystemExit naming both)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    shape = {"dim": config.get("dim", config.get("hidden_size")),
             "n_layers": config.get("n_layers", config.get("num_hidden_layers")),
             "use_moe": bool(config.get("use_moe", config.get("num_experts") or config.get("n_routed_experts")))}
    wanted = {name: getattr(args, name) for name in shape if getattr(args, name) is not None}
    if any(shape[name] != value for name, value in wanted.items()):
        said = {name: shape[name] for name in shape if name != "use_moe" or "use_moe" in wanted}
        raise SystemExit(f"{program}: {path} has {', '.join(f'{k} {format_value(v)}' for k, v in said.items())}, "
                         f"not {', '.join(f'{k} {format_value(v)}' for k, v in wanted.items())}")


def seed_main(argv: list[str] | None = None) -> None:
    """Seed 000's `eval_model.py --model_mode 0|1|2 [--dim D --n_layers N] [--stream True]`: the chat with
    out/pretrain (as text completion: a pretrained model continues text), out/sft or out/dpo's final model. There
    `--dim` and `--n_layers` (and MiniMind's `--use_moe`) picked the checkpoint file; here the model directory holds its
    own shape, which they must match, as `--use_moe` must its kind. Replies always stream. Other flags are the chat's."""
    parser = ArgumentParser(prog="eval_model.py", description=seed_main.__doc__)
    parser.add_argument("--model_mode", type=int, choices=sorted(SEED_MODEL_MODES), default=1,
                        help="0 pretrained, 1 SFT, 2 DPO")
    parser.add_argument("--out_dir", default="out", help="the layout root holding pretrain/, sft/ and dpo/")
    add_seed_shape_flags(parser)
    parser.add_argument("--stream", choices=["True", "False", "true", "false", "1", "0"], default="True")
    args, chat_flags = parser.parse_known_args(argv)
    path = Path(args.out_dir) / SEED_MODEL_MODES[args.model_mode] / "final"
    check_seed_shape(path, args, "eval_model")
    completion = ["--text_completion"] if SEED_MODEL_MODES[args.model_mode] == "pretrain" else []
    main(["--model_path", str(path), *completion, *chat_flags])


if __name__ == "__main__":
    run_main(main)
