"""Stage 1: BPE training, special token ids, round trips, AutoTokenizer + chat template, CLI errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mateconv.chat_format import CHAT_TEMPLATE, SPECIAL_TOKENS, render_chat
from mateconv.data import embedded
from mateconv.data import DataError
from mateconv.data.prepare import prepare
from mateconv.tokenizer import (REFERENCE_TOKENIZER, compared_tokenizers, compression, main, report_samples,
                                save_pretrained_portable, train_tokenizer)

TEXTS = {
    "chinese": "床前明月光，疑是地上霜。举头望明月，低头思故乡。今天天气很好！",
    "english": "The quick brown fox jumps over the lazy dog; it's 3.14 o'clock.",
    "emoji": "Party time 🎉🥳 — naïve café 👩‍💻 ✅",
    "code": "def area(r: float) -> float:\n\treturn 3.14159 * r ** 2  # 面积\n\nprint({'k': [1, 2]})\n",
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    embedded.generate(root / "raw", pretrain_chars=150_000, sft_conversations=300, dpo_pairs=50, train_tasks=20,
                      val_tasks=20)
    return train_tokenizer([root / "raw"], root / "tokenizer", vocab_size=600)


def test_special_tokens_have_fixed_ids(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token == "<|endoftext|>"
    assert len(tokenizer) == 600
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(tokenizer_dir, name):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXTS[name]
    assert all(3 <= i < len(tokenizer) for i in ids)  # plain text never produces special tokens


def test_chat_template_matches_render_chat(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                    {"role": "assistant", "content": "Hi 😀"}, {"role": "user", "content": "2 + 2?"},
                    {"role": "assistant", "content": "The answer is 4."}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\nHi 😀<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\nThe answer is 4.<|im_end|>\n")
    rendered, spans = render_chat(conversation)
    assert rendered == text
    assert [text[a:b] for a, b in spans] == ["Hi 😀<|im_end|>", "The answer is 4.<|im_end|>"]
    prompt = tokenizer.apply_chat_template(conversation[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(conversation[:4], add_generation_prompt=True)[0] == prompt
    ids = tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"]
    assert ids.count(1) == 5 and ids.count(2) == 5
    assert tokenizer.decode(ids) == text


def test_assistant_mask_from_template_generation_markers(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    out = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "hello there<|im_end|>"


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file or directory"):
        main(["--corpus", str(tmp_path / "missing.jsonl"), "--out_dir", str(tmp_path / "tok")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="no text found"):
        main(["--corpus", str(empty), "--out_dir", str(tmp_path / "tok")])
    with pytest.raises(SystemExit, match="too small"):
        main(["--corpus", str(empty), "--vocab_size", "100", "--out_dir", str(tmp_path / "tok")])
    broken = tmp_path / "broken" / "tokenizer.json"  # a download cut short, a file saved by hand
    broken.parent.mkdir()
    broken.write_text('{"version": "1.0", "model": ')
    with pytest.raises(SystemExit, match=rf"^error: {broken}: not a readable tokenizer.json: EOF while parsing"):
        main(["--from_pretrained", str(broken.parent), "--out_dir", str(tmp_path / "tok")])


def test_training_flags_with_from_pretrained_are_an_error_not_ignored(tmp_path, capsys):
    """`--tokenizer MiniMind --set tokenizer.vocab_size=4096` ran `--from_pretrained DIR --vocab_size 4096` and kept
    6400 tokens without a word."""
    with pytest.raises(SystemExit) as stopped:
        main(["--from_pretrained", str(tmp_path), "--vocab_size", "4096", "--out_dir", str(tmp_path / "tok")])
    assert stopped.value.code == 2 and not (tmp_path / "tok").exists()
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --vocab_size goes with --corpus: --from_pretrained keeps the tokenizer's vocabulary as it is")


def test_pre_tokenizer_splits_as_qwen2(tokenizer_dir):
    """Text is split as Qwen2 does (what llama.cpp calls "qwen2" and ollama's engine applies to every Qwen3 model):
    digits one by one, a punctuation mark joined to the word after it, newline runs apart. GPT-2's split, used
    before, kept "2024" whole and made ollama tokenize Qwen3 exports unlike training."""
    split = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.pre_tokenizer
    text = "在2024年，今天 DON'T\n\n  go"
    pieces = [text[start:end] for _, (start, end) in split.pre_tokenize_str(text)]
    assert pieces == ["在", "2", "0", "2", "4", "年", "，今天", " DON", "'T", "\n\n", " ", " go"]


def test_config_loads_in_transformers_4_and_5(tokenizer_dir):
    """tokenizer_config.json names PreTrainedTokenizerFast, which transformers 4 (LLaMA-Factory, vLLM releases on 4,
    llama.cpp's convert_hf_to_gguf.py) and 5 both load; transformers 5 writes its internal TokenizersBackend, which 4
    refuses ("Tokenizer class TokenizersBackend does not exist or is not currently imported")."""
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|endoftext|>")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # TRL warns when they are the same
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi", add_special_tokens=False)


def test_extra_special_tokens_saved_as_transformers_4_reads_them(tokenizer_dir, tmp_path):
    """A tokenizer with extra special tokens (Qwen2.5's, when continued pretraining saves it): transformers 5 writes
    them as a list under extra_special_tokens, where 4 expects a dict and fails to load; under 4's
    additional_special_tokens both read them as special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    save_pretrained_portable(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in config
    assert config["additional_special_tokens"] == ["<tool_call>", "</tool_call>"]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.extra_special_tokens == ["<tool_call>", "</tool_call>"]
    ids = reloaded.encode("<tool_call>hi</tool_call>", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<tool_call>")
    assert reloaded.decode(ids, skip_special_tokens=True) == "hi"


def test_trains_on_the_text_stage_2_writes(tmp_path):
    """Stage 2 with NFKC writes full-width `Ｔｈｅ，` as `The,`: the tokenizer learns its merges on that same text.
    Before, it trained on the raw full-width forms, and the text the model sees came out a token per letter."""
    from tokenizers import Tokenizer

    line = "Ｔｈｅ ｒｉｖｅｒ ｒｕｎｓ ｐａｓｔ ｔｈｅ ｏｌｄ ｍｉｌｌ，ｓｌｏｗｌｙ ａｎｄ ｑｕｉｅｔｌｙ．"
    corpus = tmp_path / "wide.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{line} {i}"}) + "\n" for i in range(100)))
    prepare({"pretrain": [corpus]}, tmp_path / "data", val_frac=0, progress=False, normalization="NFKC")
    text = json.loads((tmp_path / "data/pretrain_train.jsonl").read_text().splitlines()[0])["text"]
    assert text.startswith("The river runs past the old mill,slowly")
    tokenizer = Tokenizer.from_file(str(train_tokenizer([corpus], tmp_path / "tok", vocab_size=320, normalization="NFKC") / "tokenizer.json"))
    assert len(tokenizer.encode(text).ids) < len(text) / 3


def test_special_tokens_written_in_the_corpus_get_no_merges(tmp_path):
    """MiniMind's pretraining text writes <|im_end|> after each document: the BPE learnt "<|", "|>" and "im" for it,
    vocabulary that encoding never uses (the special token always matches whole)."""
    from tokenizers import Tokenizer

    corpus = tmp_path / "pretrain_hq.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"<|im_start|>a short note {i}<|im_end|> <|im_start|>one more"
                                                  f"<|im_end|>"}) + "\n" for i in range(200)))
    tokenizer = Tokenizer.from_file(str(train_tokenizer([corpus], tmp_path / "tok", vocab_size=400) / "tokenizer.json"))
    learnt = [token for token in tokenizer.get_vocab() if len(token) > 1 and token not in SPECIAL_TOKENS]
    assert learnt and not [token for token in learnt if "|" in token or "<" in token]
    assert tokenizer.encode("note<|im_end|>").tokens[-1] == "<|im_end|>"


def test_training_off_a_terminal_says_how_far_it_is(tmp_path, capsys):
    """Off a terminal (the pipeline's log, nohup) the stage said nothing until "tokenizer saved": on MiniMind's
    gigabytes, reading the corpus and then learning the merges (most of the time on Chinese text) went by in silence."""
    corpus = tmp_path / "pretrain.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"river {i} runs past the mill"}) + "\n" for i in range(200)))
    train_tokenizer([corpus], tmp_path / "tok", vocab_size=300)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("[tokenizer corpus] ") and "(100%) docs 200 " in line for line in lines), lines
    assert any(line.startswith("[tokenizer] learning the merges of a 300-token BPE from 200 documents") for line in lines)


def test_a_corpus_with_no_readable_text_names_the_first_reason(tmp_path):
    """A Chinese corpus saved as GBK is not UTF-8: the error says so, at the file and line, and how to convert it."""
    gbk = tmp_path / "poems.txt"
    gbk.write_bytes("床前明月光\n疑是地上霜\n".encode("gbk"))
    with pytest.raises(SystemExit, match=rf"^error: no text found in .*; the first record skipped: {gbk}:1: "
                                         r".*not UTF-8 text.*iconv -f GBK"):
        main(["--corpus", str(gbk), "--out_dir", str(tmp_path / "tok")])
    with pytest.raises(DataError, match=rf"^no text found in \['{gbk}'\]; the first record skipped: {gbk}:1: .*not UTF-8"):
        report_samples({"zh": [gbk]})  # the notebook's held-out text: no 0.000 chars/token row


def test_held_out_text_that_is_not_there_is_named(tmp_path, capsys):
    """The notebook's compression report left out a misspelled eval_texts file, and compared on the demo prose when
    none of a language's files was there, without a word."""
    poem = tmp_path / "zh.txt"
    poem.write_text("床前明月光，疑是地上霜。\n", encoding="utf-8")
    samples = report_samples({"zh": [poem, tmp_path / "zh2.txt"], "en": [tmp_path / "wiki.txt"]}, 1000)
    assert samples["zh"] == ["床前明月光，疑是地上霜。"] and samples["en"]
    assert capsys.readouterr().out.splitlines() == [
        f"zh: not found: {tmp_path / 'zh2.txt'}",
        f"en: not found: {tmp_path / 'wiki.txt'}; comparing on the embedded demo prose instead"]


def test_a_reference_tokenizer_given_that_is_not_there_is_an_error(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """Notebook 1's `reference_tokenizer` misspelt (`.../minimind/modle`) compared ours alone without a word; a path
    given is an error, the default one absent (no shared data) a note."""
    monkeypatch.chdir(tmp_path)
    assert compared_tokenizers("ours", tiny_tokenizer) == {"mateconv": "ours", "minimind": tiny_tokenizer}
    with pytest.raises(DataError, match="^reference_tokenizer minimind/modle: no such directory$"):
        compared_tokenizers("ours", "minimind/modle")
    with pytest.raises(DataError, match=f"^reference_tokenizer {tmp_path}: no tokenizer.json there$"):
        compared_tokenizers("ours", tmp_path)
    assert compared_tokenizers("ours", None) == compared_tokenizers("ours", REFERENCE_TOKENIZER) == {"mateconv": "ours"}
    assert capsys.readouterr().out == (f"note: no {REFERENCE_TOKENIZER} (MiniMind's tokenizer, in the shared data): "
                                       "comparing ours alone\n")


def test_the_compression_report_does_not_warn_of_long_texts(tiny_tokenizer):
    """A held-out document longer than the model's context made transformers warn that it 'will result in indexing
    errors' under the notebook's report, which only counts its tokens."""
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # transformers' own handler keeps the stream it began with
    try:
        row = compression(AutoTokenizer.from_pretrained(tiny_tokenizer), ["river stone light " * 12_000])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert row["tokens"] > 32768 and warned == []


def test_a_corpus_given_as_one_string_is_one_path(tmp_path, monkeypatch):
    """Notebook 1's `corpus = "poems.txt"` (no list) was read as the paths "p", "o", ... ("." the whole working
    directory, "/" the whole disk)."""
    monkeypatch.chdir(tmp_path)
    Path("poems.txt").write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 20, encoding="utf-8")
    train_tokenizer("poems.txt", "tok", vocab_size=300)
    assert (tmp_path / "tok/tokenizer.json").is_file()
    stats = prepare({"pretrain": "poems.txt"}, "data", progress=False)["pretrain"]  # notebook 2's `pretrain = "..."`
    assert stats["read"] == 20 and stats["sources"] == ["poems.txt"]
    assert len(report_samples({"zh": "poems.txt"})["zh"]) == 20  # notebook 1's eval_texts
