"""Stage 1: train a byte-level BPE tokenizer with fixed special tokens and a ChatML chat template.

    python -m mateconv.tokenizer --corpus out/raw/embedded ../shared/data/karpathy__char-rnn --vocab_size 6400 \
        --out_dir out/tokenizer

The special tokens and the chat template come from `mateconv.chat_format`.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mateconv.chat_format import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS
from mateconv.data import DataError, read_tokenizer
from mateconv.data.clean import DEFAULT_NORMALIZATION, NORMALIZATIONS, normalize
from mateconv.data.embedded import all_tasks, pretrain_docs
from mateconv.data.readers import BadLine, ReadProgress, iter_sources, path_list, record_text
from mateconv.files import save_figure, write_atomic
from mateconv.flags import ArgumentParser, DefaultsHelpFormatter
from mateconv.terminal import PlainProgress, bars_only_on_a_terminal, on_terminal, run_main

# Qwen2's split (digits one by one, a punctuation mark joined to the word after it, newline runs apart). llama.cpp
# knows it as the "qwen2" pre-tokenizer, and ollama's own engine splits every Qwen3 model's text with it whatever the
# GGUF says (the pattern is fixed in its model/models/qwen3/model.go); GPT-2's split, used before, matched llama.cpp
# but not ollama's Qwen3 engine.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


def byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """SPLIT_PATTERN's pieces, each mapped to GPT-2's byte alphabet (no prefix space, no normalizer before it)."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def corpus_texts(paths: Iterable[str | Path], max_chars: int | None = None,
                 normalization: str = DEFAULT_NORMALIZATION, skipped: list[str] | None = None,
                 read: ReadProgress | None = None) -> Iterator[str]:
    """Texts of every record of the corpus paths (bad records skipped; the first one's "file:line: why" is added to
    `skipped`), normalised as stage 2 normalises them (the model sees only that text), stopping after max_chars
    characters. `read` follows the files as they are read."""
    total = 0
    for source, number, record in iter_sources(paths):
        if read is not None:
            read.reading(source)
        try:
            if isinstance(record, BadLine):
                raise DataError(record.error)
            text = normalize(record_text(record), normalization)
        except DataError as error:
            if skipped is not None and not skipped:
                skipped.append(f"{source}:{number}: {error}")
            continue
        if text.strip():
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return


def no_text_found(paths: list[str | Path], skipped: list[str]) -> DataError:
    return DataError(f"no text found in {[str(p) for p in paths]}"
                     + (f"; the first record skipped: {skipped[0]}" if skipped else ""))


def without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    """The texts' pieces between special tokens written out in them (MiniMind's pretraining text ends each document
    with a literal <|im_end|>): the BPE would learn merges for their parts ("<|", "|>"), which encoding never uses, since
    a special token always matches whole."""
    special = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
    for text in texts:
        yield from (piece for piece in special.split(text) if piece)


def reported(texts: tqdm, read: ReadProgress, vocab_size: int, whole: bool) -> Iterator[str]:
    """The texts, and off a terminal (where the bars draw nothing) plain lines on how much of the corpus is read (all
    of it at the end where `whole`, not cut by max_chars), then one when the merges begin: they show no progress
    there and take most of the time on Chinese text."""
    plain = PlainProgress("tokenizer corpus", read.total / 1e6, "MB")
    shown = time.monotonic()
    for text in texts:
        yield text
        if time.monotonic() - shown >= 1.0:
            shown = time.monotonic()
            plain.update(read.done() / 1e6, docs=texts.n)
    if whole:
        plain.update(read.total / 1e6, docs=texts.n)
    if not on_terminal():
        print(f"[tokenizer] learning the merges of a {vocab_size:,}-token BPE from {texts.n:,} documents",
              flush=True)


def train_tokenizer(corpus: list[str | Path], out_dir: str | Path, vocab_size: int = 6400,
                    min_frequency: int = 2, max_chars: int | None = None, model_max_length: int = 32768,
                    normalization: str = DEFAULT_NORMALIZATION, progress: bool = True) -> Path:
    """Train the BPE on the corpus, normalised as stage 2's `--normalization` does, and save a Hugging Face tokenizer
    directory; returns out_dir. `progress`: bars on a terminal, plain lines off one (`reported`)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least 259 tokens")
    os.environ["TOKENIZERS_PARALLELISM"] = os.environ.get("TOKENIZERS_PARALLELISM", "true")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress and on_terminal())
    skipped: list[str] = []
    read = ReadProgress(corpus)
    texts = corpus_texts(corpus, max_chars, normalization, skipped, read)
    first = next(texts, None)
    if first is None:
        raise no_text_found(corpus, skipped)
    texts = itertools.chain([first], texts)
    if progress:
        texts = reported(tqdm(texts, desc="tokenizer corpus", unit="doc"), read, vocab_size, max_chars is None)
    tokenizer.train_from_iterator(without_special_tokens(texts), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise DataError(f"special token {token} did not get id {token_id}")
    return save_tokenizer(tokenizer, out_dir, model_max_length)


def adopt_tokenizer(source: str | Path, out_dir: str | Path, model_max_length: int = 32768) -> Path:
    """Another project's byte-level BPE (e.g. MiniMind's `model/` directory or its tokenizer.json) as a MateConv
    tokenizer: same vocabulary and merges, our special-token roles and ChatML template. Its special tokens must
    already have our fixed ids."""
    source = Path(source)
    path = source / "tokenizer.json" if source.is_dir() else source
    if not path.is_file():
        raise DataError(f"{source}: no tokenizer.json there")
    tokenizer = read_tokenizer(path)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise DataError(f"{path}: special token {token} has id {tokenizer.token_to_id(token)}, MateConv needs "
                            f"{token_id} (train a tokenizer on your data instead)")
    return save_tokenizer(tokenizer, out_dir, model_max_length)


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int = 32768) -> Path:
    """Saves a Hugging Face tokenizer directory with our special tokens and chat template, atomically per file."""
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      unk_token=PAD, model_max_length=model_max_length, chat_template=CHAT_TEMPLATE,
                                      clean_up_tokenization_spaces=False)
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_dir.exists():
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
    save_pretrained_portable(wrapped, tmp_dir)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD}
    (tmp_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tmp_dir.iterdir():
        os.replace(path, out_dir / path.name)
    tmp_dir.rmdir()
    return out_dir


def save_pretrained_portable(tokenizer, directory: str | Path) -> None:
    """`tokenizer.save_pretrained(directory)` that transformers 4 loads too (LLaMA-Factory, vLLM releases on 4,
    llama.cpp's convert_hf_to_gguf.py): transformers 5 names its internal class TokenizersBackend as tokenizer_class,
    which 4 refuses ("does not exist or is not currently imported"), PreTrainedTokenizerFast loads in both; and the
    chat template stays in tokenizer_config.json too, where loaders before chat_template.jinja look for it. A list of
    extra special tokens (Qwen2.5's, kept by continued pretraining) goes under 4's name, additional_special_tokens:
    4 takes extra_special_tokens for a dict and fails on 5's list ("'list' object has no attribute 'keys'"); 5 reads
    either."""
    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    if isinstance(tokenizer.chat_template, str):
        config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")


# ---------------------------------------------------------------- compression report

def compression(tokenizer, texts: list[str]) -> dict[str, float]:
    """Characters and UTF-8 bytes per token over the texts (higher = better compression)."""
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    # verbose=False: no warning that a text longer than the model's context cannot go through the model; it is not
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False, verbose=False)) for t in texts)
    return {"chars": chars, "bytes": nbytes, "tokens": tokens,
            "chars_per_token": chars / max(tokens, 1), "bytes_per_token": nbytes / max(tokens, 1)}


# MiniMind's 6400-token tokenizer in the shared data, from the repository root (the notebooks' working directory)
REFERENCE_TOKENIZER = "../shared/data/jingyaogong__minimind/model"


def compared_tokenizers(ours: str | Path, reference: str | Path | None) -> dict[str, str | Path]:
    """The tokenizers `compression_report` compares: ours and the `reference` directory's (None: ours alone). A
    reference given that holds no tokenizer.json is a DataError; the default one absent (no shared data here) a note."""
    tokenizers = {"mateconv": ours}
    if reference is None:
        return tokenizers
    if (Path(reference) / "tokenizer.json").is_file():
        return {**tokenizers, "minimind": reference}
    if str(reference) != REFERENCE_TOKENIZER:
        why = "no tokenizer.json there" if Path(reference).is_dir() else "no such directory"
        raise DataError(f"reference_tokenizer {reference}: {why}")
    print(f"note: no {reference} (MiniMind's tokenizer, in the shared data): comparing ours alone")
    return tokenizers


def compression_report(tokenizers: dict[str, str | Path], samples: dict[str, list[str]],
                       report_dir: str | Path) -> list[dict]:
    """Compare tokenizers on held-out text samples; writes compression.csv, compression.md and compression.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name, path in tokenizers.items():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        for language, texts in samples.items():
            rows.append({"tokenizer": name, "vocab_size": len(tokenizer), "text": language,
                         **compression(tokenizer, texts)})
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(report_dir / "compression.csv", table.getvalue())
    lines = ["| tokenizer | vocab | text | chars | tokens | chars/token | bytes/token |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokenizer']} | {r['vocab_size']} | {r['text']} | {r['chars']} | {r['tokens']} | "
              f"{r['chars_per_token']:.3f} | {r['bytes_per_token']:.3f} |" for r in rows]
    write_atomic(report_dir / "compression.md", "\n".join(lines) + "\n")

    names, languages = list(tokenizers), list(samples)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(names)
    for axis, metric in zip(axes, ("chars_per_token", "bytes_per_token")):
        for i, name in enumerate(names):
            values = [next(r[metric] for r in rows if r["tokenizer"] == name and r["text"] == lang) for lang in languages]
            axis.bar([x + i * width for x in range(len(languages))], values, width, label=name)
        axis.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(languages))], languages)
        axis.set_title(metric.replace("_", " "))
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, report_dir / "compression.png", dpi=100)
    plt.close(fig)
    return rows


def _is_chinese(text: str) -> bool:
    han = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return han > 0.3 * max(1, len(text.strip()))


def report_samples(paths: dict[str, list[str | Path]], max_chars: int = 200_000) -> dict[str, list[str]]:
    """Held-out texts per language from the given files (a DataError when they hold none); a language whose files
    are all missing falls back to embedded-generator prose made with another seed than the training data. Each
    missing file is named."""
    samples = {}
    for language, language_paths in paths.items():
        language_paths = path_list(language_paths)
        present = [p for p in language_paths if Path(p).exists()]
        missing = [str(p) for p in language_paths if not Path(p).exists()]
        if missing:
            print(f"{language}: not found: {', '.join(missing)}"
                  + ("" if present else "; comparing on the embedded demo prose instead"))
        if present:
            skipped: list[str] = []
            samples[language] = list(corpus_texts(present, max_chars, skipped=skipped))
            if not samples[language]:
                raise no_text_found(present, skipped)
        else:
            docs = pretrain_docs(all_tasks(seed=7), 4 * max_chars, random.Random(7))
            picked, total = [], 0
            for doc in docs:
                if _is_chinese(doc) == (language == "zh") and total < max_chars:
                    picked.append(doc)
                    total += len(doc)
            samples[language] = picked
    return samples


# The training flags and their defaults: not set unless given (SUPPRESS), so that one given with --from_pretrained
# is told apart
TRAINING_DEFAULTS = {"vocab_size": 6400, "min_frequency": 2, "max_chars": None, "normalization": DEFAULT_NORMALIZATION}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mateconv.tokenizer", description=__doc__.split("\n\n")[0],
                            formatter_class=DefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", nargs="+", help="jsonl/json/txt/parquet files or directories to train on")
    source.add_argument("--from_pretrained", metavar="PATH",
                        help="use this tokenizer.json (or a directory holding one, e.g. MiniMind's model/) instead")
    parser.add_argument("--vocab_size", type=int, default=argparse.SUPPRESS,
                        help=f"(default: {TRAINING_DEFAULTS['vocab_size']})")
    parser.add_argument("--min_frequency", type=int, default=argparse.SUPPRESS,
                        help=f"(default: {TRAINING_DEFAULTS['min_frequency']})")
    parser.add_argument("--max_chars", type=int, default=argparse.SUPPRESS,
                        help="stop reading the corpus after this many chars (default: all of it)")
    parser.add_argument("--normalization", default=argparse.SUPPRESS, choices=NORMALIZATIONS,
                        help="Unicode normalisation of the corpus: the same as stage 2's (the text the model sees) "
                             f"(default: {DEFAULT_NORMALIZATION})")
    parser.add_argument("--out_dir", default="out/tokenizer")
    parser.add_argument("--no_progress", action="store_true", help="no bars, no progress lines")
    return parser


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What parsing cannot say (parser.error): training flags given with --from_pretrained. The pipeline checks it
    too before any stage runs."""
    given = [name for name in TRAINING_DEFAULTS if name in vars(args)]
    if args.from_pretrained and given:
        parser.error(f"--{' --'.join(given)} {'goes' if len(given) == 1 else 'go'} with --corpus: --from_pretrained "
                     "keeps the tokenizer's vocabulary as it is")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    settings = {name: getattr(args, name, default) for name, default in TRAINING_DEFAULTS.items()}
    bars_only_on_a_terminal()
    try:
        out = (adopt_tokenizer(args.from_pretrained, args.out_dir) if args.from_pretrained else
               train_tokenizer(args.corpus, args.out_dir, settings["vocab_size"], settings["min_frequency"],
                               settings["max_chars"], normalization=settings["normalization"],
                               progress=not args.no_progress))
    except DataError as error:
        sys.exit(f"error: {error}")
    print(f"tokenizer saved to {out}")


if __name__ == "__main__":
    run_main(main)
