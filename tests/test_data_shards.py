"""Stage 3: packing, loss masks, DPO pairs, parallel == serial, resumability, bad-input reporting, CLI."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import AutoTokenizer

from mateconv.data import DataError, embedded
from mateconv.data.shards import DPOTokens, PretrainTokens, SFTTokens, plan_rows, shard_info
from mateconv.data.tokenizing import build_all, build_shards, write_sft_rows
from mateconv.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    embedded.generate(root / "raw", pretrain_chars=60_000, sft_conversations=200, dpo_pairs=60, train_tasks=10,
                      val_tasks=10)
    tokenizer_dir = train_tokenizer([root / "raw"], root / "tokenizer", vocab_size=500)
    return root, tokenizer_dir, AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def test_pretrain_packing_counts_and_windows(setup, tmp_path):
    root, tokenizer_dir, tokenizer = setup
    texts = [json.loads(line)["text"] for line in open(root / "raw/pretrain.jsonl")]
    result = build_shards("pretrain", [root / "raw/pretrain.jsonl"], tokenizer_dir, tmp_path / "p", workers=2,
                          records_per_shard=37, chunk_records=8, progress=False)
    expected = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    info = shard_info(tmp_path / "p")
    assert info["num_tokens"] == sum(len(ids) for ids in expected)  # doc lengths + one separator each
    assert info["num_records"] == len(texts) and info["num_shards"] == -(-len(texts) // 37)
    assert info["dtype"] == "uint16" and info["eos_id"] == 2 and result.bad_records == []
    stream = np.concatenate([np.asarray(ids) for ids in expected])
    doc_starts = np.cumsum([0] + [len(ids) for ids in expected])[:-1]
    dataset = PretrainTokens(tmp_path / "p", seq_len=64)
    rows = [dataset[i]["input_ids"].numpy() for i in range(len(dataset))]
    assert all(len(row) == 64 for row in rows)
    assert all(torch.equal(dataset[i]["labels"], dataset[i]["input_ids"]) for i in (0, len(dataset) - 1))
    for i in (0, 7, len(dataset) - 1):  # positions count from the row's start and from each EOS in it
        row, positions = rows[i].tolist(), dataset[i]["position_ids"].tolist()
        opens = [t for t, token in enumerate(row) if t == 0 or token == tokenizer.eos_token_id]
        assert positions == [t - max(o for o in opens if o <= t) for t in range(64)]
    # every stream token is in at most one row, and all are but those of a last, unfilled row (< 63 tokens)
    pieces = sorted(zip(dataset.piece_starts.tolist(), dataset.piece_lengths.tolist()))
    assert all(start + n <= after for (start, n), (after, _) in zip(pieces, pieces[1:]))
    assert 0 <= len(stream) - sum(n for _, n in pieces) < 63 and len(dataset) == len(stream) // 63
    for i, row in enumerate(rows):  # the token before the row's first piece, then its pieces, from the stream
        bounds = slice(dataset.row_bounds[i], dataset.row_bounds[i + 1])
        first = int(dataset.piece_starts[bounds][0])
        expected_row = [stream[first - 1] if first else tokenizer.eos_token_id] + [
            t for start, n in zip(dataset.piece_starts[bounds], dataset.piece_lengths[bounds])
            for t in stream[start: start + n]]
        assert row.tolist() == expected_row
    # best fit: far fewer documents that fit in a row are split across two than by cutting the stream every 63
    dataset = PretrainTokens(tmp_path / "p", seq_len=256)
    whole = set(zip(dataset.piece_starts.tolist(), dataset.piece_lengths.tolist()))
    fitting = [(int(start), len(ids)) for start, ids in zip(doc_starts, expected) if len(ids) <= 255]
    split = [doc for doc in fitting if doc not in whole]
    cut_by_windows = [(start, n) for start, n in fitting if start // 255 != (start + n - 1) // 255]
    assert len(fitting) > 100 and len(split) < 0.5 * len(cut_by_windows), (len(split), len(cut_by_windows))
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_pretrain_stream_without_a_final_eos_keeps_its_tail(tmp_path):
    """Hand-written shards (a record with no EOS at all, or a stream cut mid-record) still give rows: the tokens after
    the last record end form one more document. Shards of the older format (no record boundaries) are refused."""
    streams = {"no_eos": (np.arange(3, 403) % 60 + 3, [0, 400]),
               "cut": (np.r_[np.arange(3, 50), 2, np.arange(3, 353)], [0, 48])}
    for name, (stream, offsets) in streams.items():
        directory = tmp_path / name
        directory.mkdir()
        stream.astype(np.uint16).tofile(directory / "shard_00000.tokens.bin")
        np.asarray(offsets, dtype=np.int64).tofile(directory / "shard_00000.offsets.bin")
        (directory / "index.json").write_text(json.dumps({
            "kind": "pretrain", "dtype": "uint16", "vocab_size": 128, "eos_id": 2, "pad_id": 0, "format_version": 2,
            "shards": [{"name": "shard_00000", "num_tokens": len(stream), "num_records": 1}], "complete": True}))
        dataset = PretrainTokens(directory, seq_len=32)
        assert len(dataset) == len(stream) // 31, name
        covered = sum(int(n) for n in dataset.piece_lengths)
        assert len(stream) - 31 < covered <= len(stream), name
    index = json.loads((tmp_path / "cut" / "index.json").read_text())
    (tmp_path / "cut" / "index.json").write_text(json.dumps({**index, "format_version": 1}))
    with pytest.raises(DataError, match=r"cut: pretraining shards of an older MateConv, without document boundaries; "
                                         r"run 3.dataset.py again \(it rebuilds them\)$"):
        PretrainTokens(tmp_path / "cut", seq_len=32)


def test_a_record_with_eos_tokens_inside_stays_one_document(setup, tmp_path):
    """MiniMind's pretrain_hq.jsonl holds whole chats as text (`<|im_start|>Q<|im_end|> <|im_start|>A<|im_end|>`):
    the literal <|im_end|> are EOS tokens, yet each record is one document, so positions run on through them and
    with document_mask the answer sees its question. Before, each inner EOS began a new document (3 per record)."""
    _, tokenizer_dir, tokenizer = setup
    chats = [{"text": f"<|im_start|>question {i}?<|im_end|> <|im_start|>answer {i}.<|im_end|>"} for i in range(40)]
    build_shards("pretrain", [write_jsonl(tmp_path / "pretrain_hq.jsonl", chats)], tokenizer_dir, tmp_path / "p",
                 workers=1, progress=False)
    dataset = PretrainTokens(tmp_path / "p", seq_len=128)
    assert len(dataset.doc_ends) == 40
    for i in range(len(dataset)):
        ids, positions = dataset[i]["input_ids"].tolist(), dataset[i]["position_ids"].tolist()
        restarts = [t for t, p in enumerate(positions) if p == 0]
        assert ids.count(tokenizer.eos_token_id) >= 3 * (len(restarts) - 1) > 0  # inner EOS do not restart
        for t in restarts[1:]:  # each later restart is a record's final EOS: the next token opens a chat
            assert ids[t] == tokenizer.eos_token_id and tokenizer.decode(ids[t + 1: t + 2]) == "<|im_start|>"


def test_sft_loss_mask_is_exactly_the_assistant_turns(setup, tmp_path):
    _, tokenizer_dir, tokenizer = setup
    conversations = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 加 5？"},
                      {"role": "assistant", "content": "答案是 12。"}, {"role": "user", "content": "And 1 + 1?"},
                      {"role": "assistant", "content": "The answer is 2. 🎉"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "\n\nhello\n"}]},
        {"instruction": "Repeat", "input": "cat", "output": "cat"},
    ]
    build_shards("sft", [write_jsonl(tmp_path / "sft.jsonl", conversations)], tokenizer_dir, tmp_path / "s",
                 workers=1, progress=False)
    dataset = SFTTokens(tmp_path / "s", seq_len=96)
    from mateconv.data.formats import to_sft

    for i, record in enumerate(conversations):
        messages = to_sft(record)["messages"]
        item = dataset[i]
        assert "attention_mask" not in item  # right padding: plain causal attention is exact
        n = int((item["input_ids"] != tokenizer.pad_token_id).sum())
        assert item["token_mask"].tolist() == [1] * n + [0] * (96 - n)  # what MoE load and balance loss count
        expected_ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
        assert item["input_ids"][:n].tolist() == expected_ids
        assert (item["input_ids"][n:] == tokenizer.pad_token_id).all() and (item["labels"][n:] == -100).all()
        trained = item["labels"][item["labels"] != -100]
        assert tokenizer.decode(trained) == "".join(m["content"] + "<|im_end|>" for m in messages
                                                    if m["role"] == "assistant")
        # the mask is one contiguous run per assistant turn
        runs = np.diff(np.r_[0, (item["labels"] != -100).int().numpy(), 0])
        assert (runs == 1).sum() == sum(m["role"] == "assistant" for m in messages)
    width = int(np.flatnonzero(dataset[0]["labels"] != -100)[0]) + 2  # through the first assistant token, and one
    short = SFTTokens(tmp_path / "s", seq_len=width)[0]  # truncation keeps the first seq_len tokens
    assert short["input_ids"].shape == (width,) and (short["input_ids"] != tokenizer.pad_token_id).all()


def test_a_conversation_with_no_assistant_token_within_seq_len_is_left_out(setup, tmp_path):
    _, tokenizer_dir, tokenizer = setup
    rules = {"role": "system", "content": " ".join(["Answer politely and check every fact twice."] * 20)}
    conversations = [{"messages": ([rules] if i == 1 else []) + [{"role": "user", "content": f"Question {i}?"},
                                                                 {"role": "assistant", "content": f"Answer {i}."}]}
                     for i in range(3)]
    build_shards("sft", [write_jsonl(tmp_path / "sft.jsonl", conversations)], tokenizer_dir, tmp_path / "s",
                 workers=1, progress=False)
    for packing in (False, True):
        dataset = SFTTokens(tmp_path / "s", seq_len=64, packing=packing)
        assert (dataset.untrained, dataset.num_records) == (1, 2)
        trained = [tokenizer.decode(item["labels"][item["labels"] != -100]) for item in dataset]
        assert sorted("".join(trained).split("<|im_end|>")) == ["", "Answer 0.", "Answer 2."]  # packing may reorder


def test_ready_made_rows_read_back_padded_with_every_token_trained(setup, tmp_path):
    _, tokenizer_dir, tokenizer = setup
    rows = [[tokenizer.bos_token_id, 7, 8, 9, tokenizer.eos_token_id], [5] * 12, [6]]
    dataset = SFTTokens(write_sft_rows(rows, tokenizer_dir, tmp_path / "rows"), seq_len=8)
    assert len(dataset) == 3 and shard_info(tmp_path / "rows")["num_tokens"] == 18
    for row, item in zip(rows, dataset):
        n = min(len(row), 8)
        assert item["input_ids"][:n].tolist() == item["labels"][:n].tolist() == row[:n]
        assert (item["input_ids"][n:] == tokenizer.pad_token_id).all() and (item["labels"][n:] == -100).all()
        assert "attention_mask" not in item and item["token_mask"].tolist() == [1] * n + [0] * (8 - n)


def test_planning_whole_documents_cuts_none_and_keeps_the_last_row():
    lengths = np.array([5, 9, 3, 8, 1, 7, 10, 2, 6, 4])
    starts, pieces, bounds = plan_rows(lengths, 10, pool_size=4, split=False)
    doc_starts = (np.cumsum(lengths) - lengths).tolist()
    assert sorted(starts.tolist()) == doc_starts and pieces.tolist() == [lengths[doc_starts.index(s)] for s in starts]
    rows = [pieces[bounds[r]:bounds[r + 1]].sum() for r in range(len(bounds) - 1)]
    assert max(rows) <= 10 and sum(rows) == lengths.sum() and len(rows) == 6  # 55 tokens: 6 rows of 10 at best


@pytest.mark.parametrize("seq_len", [128, 256])
def test_packed_sft_rows_hold_each_conversation_whole_once(setup, tmp_path, seq_len):
    root, tokenizer_dir, tokenizer = setup
    build_shards("sft", [root / "raw/sft.jsonl"], tokenizer_dir, tmp_path / "s", workers=2,
                 records_per_shard=40, progress=False)
    single, packed = SFTTokens(tmp_path / "s", seq_len), SFTTokens(tmp_path / "s", seq_len, packing=True)
    conversations = []
    for item in single:
        n = int((item["input_ids"] != tokenizer.pad_token_id).sum())
        conversations.append((tuple(item["input_ids"][:n].tolist()), tuple(item["labels"][:n].tolist())))
    found = []
    for item in packed:
        assert set(item) == {"input_ids", "labels", "position_ids", "token_mask"}
        assert item["input_ids"].shape == (seq_len,)
        assert (item["token_mask"] == (item["input_ids"] != tokenizer.pad_token_id)).all()
        opens = np.flatnonzero(item["position_ids"].numpy() == 0).tolist() + [seq_len]
        for begin, end in zip(opens, opens[1:]):  # positions count up from each conversation's start
            assert item["position_ids"][begin:end].tolist() == list(range(end - begin))
            segment = (tuple(item["input_ids"][begin:end].tolist()), tuple(item["labels"][begin:end].tolist()))
            if segment[0][0] != tokenizer.pad_token_id:
                found.append(segment)
    assert sorted(found) == sorted(conversations)
    assert sorted(packed.row_records.tolist()) == list(range(len(single)))
    fewest = -(-sum(len(ids) for ids, _ in conversations) // seq_len)  # rows if no position were padding
    assert len(packed) <= 1.15 * fewest < 0.7 * len(single)


def test_packed_sft_trains_the_same_loss_as_one_conversation_per_row(setup, tmp_path):
    """With the model's document mask a packed row's loss is the unpacked rows' loss (the same labelled tokens, each
    seeing only its own conversation); without it, conversations see each other and the loss moves."""
    from model import MateConvConfig, MateConvForCausalLM
    from mateconv.train.objectives import LMObjective

    root, tokenizer_dir, tokenizer = setup
    lines = (root / "raw/sft.jsonl").read_text().splitlines()[:24]
    build_shards("sft", [write_jsonl(tmp_path / "few.jsonl", lines)], tokenizer_dir, tmp_path / "s", workers=1,
                 progress=False)
    single, packed = SFTTokens(tmp_path / "s", 128), SFTTokens(tmp_path / "s", 128, packing=True)
    assert len(packed) < len(single)
    torch.manual_seed(0)
    model = MateConvForCausalLM(MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                               vocab_size=len(tokenizer), initializer_range=0.3)).eval()

    def loss(dataset) -> float:
        batch = {key: torch.stack([item[key] for item in dataset]) for key in dataset[0]}
        with torch.no_grad():
            return LMObjective().loss(model, batch)[0].item()

    assert loss(packed) == pytest.approx(loss(single), rel=1e-5)
    model.config.document_mask = False
    assert abs(loss(packed) - loss(single)) > 1e-3


def test_dpo_pairs_share_prompt_and_mask_it(setup, tmp_path):
    root, tokenizer_dir, tokenizer = setup
    build_shards("dpo", [root / "raw/dpo.jsonl"], tokenizer_dir, tmp_path / "d", workers=2, records_per_shard=25,
                 progress=False)
    records = [json.loads(line) for line in open(root / "raw/dpo.jsonl")]
    dataset = DPOTokens(tmp_path / "d", seq_len=48)
    assert len(dataset) == len(records)
    for i in (0, 30, len(records) - 1):
        item, record = dataset[i], records[i]
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        for side in ("chosen", "rejected"):
            n = int(item[f"{side}_attention_mask"].sum())
            assert tokenizer.decode(item[f"{side}_input_ids"][:n]) == prompt + record[side][0]["content"] + "<|im_end|>"
            labels = item[f"{side}_labels"]
            assert tokenizer.decode(labels[labels != -100]) == record[side][0]["content"] + "<|im_end|>"
    tight = DPOTokens(tmp_path / "d", seq_len=12)[0]  # too long: prompt cut from the left, same on both sides
    prompt_len = int((tight["chosen_labels"] == -100).logical_and(tight["chosen_attention_mask"].bool()).sum())
    assert torch.equal(tight["chosen_input_ids"][:prompt_len], tight["rejected_input_ids"][:prompt_len])
    assert prompt_len >= 6


def test_parallel_output_equals_serial(setup, tmp_path):
    root, tokenizer_dir, _ = setup
    for workers in (1, 2):
        build_shards("sft", [root / "raw/sft.jsonl"], tokenizer_dir, tmp_path / f"w{workers}", workers=workers,
                     records_per_shard=64, chunk_records=5, progress=False)
    for path in sorted((tmp_path / "w1").glob("part-*.bin")):
        assert path.read_bytes() == (tmp_path / "w2" / path.name).read_bytes()


def test_tokenizing_off_a_terminal_prints_progress_lines(setup, tmp_path, capsys):
    """Under nohup (pytest's captured stdout is not a terminal either) stage 3 prints a plain line at each tenth of
    the input: megabytes done of the total, tokens so far, rate, elapsed and ETA."""
    root, tokenizer_dir, _ = setup
    build_shards("sft", [root / "raw/sft.jsonl"], tokenizer_dir, tmp_path / "s", workers=1, records_per_shard=64,
                 chunk_records=5)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[tokenize sft] ")]
    shares = [int(re.search(r"\((\d+)%\)", line)[1]) for line in lines]
    assert len(lines) >= 5 and shares == sorted(shares) and shares[-1] == 100, lines
    size = (root / "raw/sft.jsonl").stat().st_size / 1e6
    tokens = shard_info(tmp_path / "s")["num_tokens"]
    assert re.fullmatch(rf"\[tokenize sft\] {size:.1f}/{size:.1f} MB \(100%\) tokens {tokens:,} [\d.,]+ MB/s "
                        r"elapsed \d:\d\d:\d\d eta 0:00:00", lines[-1]), lines[-1]


def test_resume_skips_finished_and_redoes_planted_tmp(setup, tmp_path):
    root, tokenizer_dir, _ = setup
    inputs, out = [root / "raw/sft.jsonl"], tmp_path / "r"
    build_shards("sft", inputs, tokenizer_dir, out, workers=1, records_per_shard=50, progress=False)
    reference = {p.name: p.read_bytes() for p in out.glob("part-*.bin")}
    assert build_shards("sft", inputs, tokenizer_dir, out, workers=1, records_per_shard=50,
                        progress=False).skipped_shards == 4
    # Simulate a kill while shard 2 was written: index lists shards 0-1 only, shard 2 exists only as a truncated tmp
    index = json.loads((out / "index.json").read_text())
    index.update(complete=False, shards=index["shards"][:2])
    (out / "index.json").write_text(json.dumps(index))
    for path in out.glob("part-0000[23].*"):
        path.unlink()
    (out / "part-00002.tokens.bin.tmp").write_bytes(reference["part-00002.tokens.bin"][:7])
    (out / "part-00001.tokens.bin").write_bytes(reference["part-00001.tokens.bin"][:10])  # listed but truncated
    with pytest.raises(DataError, match="did not finish"):
        SFTTokens(out, 32)
    result = build_shards("sft", inputs, tokenizer_dir, out, workers=2, records_per_shard=50, progress=False)
    assert result.skipped_shards == 1  # shard 0 only: shard 1 failed its size check
    assert {p.name: p.read_bytes() for p in out.glob("part-*.bin")} == reference
    assert not list(out.glob("*.tmp"))
    assert len(SFTTokens(out, 512)) == 200
    # other inputs or settings invalidate the old shards instead of mixing them in
    result = build_shards("sft", inputs, tokenizer_dir, out, workers=1, records_per_shard=80, progress=False)
    assert result.skipped_shards == 0 and shard_info(out)["num_shards"] == 3


def test_hold_out_splits_a_file_into_two_disjoint_parts(setup, tmp_path):
    """hold_out ("train"|"val", share): the two builds are a stable hash split of the file's records, together all
    of them once; another share is another split (not the reused shards)."""
    root, tokenizer_dir, _ = setup
    source = root / "raw/sft.jsonl"

    def tokens(out: Path) -> np.ndarray:
        dtype = shard_info(out)["dtype"]
        return np.concatenate([np.fromfile(part, dtype=dtype) for part in sorted(out.glob("*.tokens.bin"))])

    build_shards("sft", [source], tokenizer_dir, tmp_path / "all", workers=1, progress=False)
    for split in ("train", "val"):
        build_shards("sft", [source], tokenizer_dir, tmp_path / split, workers=2, records_per_shard=64,
                     chunk_records=5, progress=False, hold_out=(split, 0.2))
    records = {name: shard_info(tmp_path / name)["num_records"] for name in ("all", "train", "val")}
    assert records["train"] + records["val"] == records["all"] == 200
    assert 20 <= records["val"] <= 60, records
    both = np.concatenate([tokens(tmp_path / "train"), tokens(tmp_path / "val")])
    assert np.array_equal(np.sort(both), np.sort(tokens(tmp_path / "all")))
    build_shards("sft", [source], tokenizer_dir, tmp_path / "val", workers=1, progress=False, hold_out=("val", 0.5))
    assert shard_info(tmp_path / "val")["num_records"] > records["val"]


def test_a_byte_order_mark_opening_a_jsonl_file_is_not_a_bad_record(setup, tmp_path):
    _, tokenizer_dir, _ = setup
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "first line"}\n{"text": "second line"}\n')
    result = build_shards("pretrain", [path], tokenizer_dir, tmp_path / "p", workers=1, progress=False)
    assert result.bad_records == [] and shard_info(tmp_path / "p")["num_records"] == 2


def test_bad_records_are_counted_with_file_and_line(setup, tmp_path):
    _, tokenizer_dir, _ = setup
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "{not json",
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ])
    result = build_shards("sft", [path], tokenizer_dir, tmp_path / "bad", workers=2, progress=False)
    assert [b.split(": ")[0] for b in result.bad_records] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "malformed JSON" in result.bad_records[0]
    assert shard_info(tmp_path / "bad")["num_records"] == 2 and result.index["bad_records"] == 3
    with pytest.raises(DataError, match=rf"{path.name}:2: malformed JSON.*strict"):
        build_shards("sft", [path], tokenizer_dir, tmp_path / "strict", workers=1, strict=True, progress=False)
    text = write_jsonl(tmp_path / "p.jsonl", [{"text": "hello"}, {"text": ""}, {"title": "x"}])
    result = build_shards("pretrain", [text], tokenizer_dir, tmp_path / "pt", workers=1, progress=False)
    assert [b.split(": ", 1)[1] for b in result.bad_records] == ["empty text", "no text field in record with keys ['title']"]
    # nothing usable at all is an error, not an empty data set that a training stage would meet later
    only_bad = write_jsonl(tmp_path / "only_bad.jsonl", [{"title": "x"}, "{not json"])
    with pytest.raises(DataError, match=r"no usable pretrain record: all 2 were bad, e\.g\. .*only_bad.jsonl:1: no"):
        build_shards("pretrain", [only_bad], tokenizer_dir, tmp_path / "none", workers=1, progress=False)
    assert not json.loads((tmp_path / "none" / "index.json").read_text())["complete"]  # a rerun tries again
    with pytest.raises(DataError, match=r"no usable pretrain record: all 2 were bad"):  # and says so again
        build_shards("pretrain", [only_bad], tokenizer_dir, tmp_path / "none", workers=1, progress=False)



def test_a_conversation_with_an_empty_turn_is_skipped_as_stage_2_skips_it(setup, tmp_path):
    """A raw file given to stage 3 or `5.full_sft.py --data_path`: an empty reply trained the model to answer
    with nothing but <|im_end|>, where stage 2 skipped the record."""
    _, tokenizer_dir, _ = setup
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"conversations": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " "}]},
        {"conversations": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
    ])
    result = build_shards("sft", [path], tokenizer_dir, tmp_path / "t", workers=1, progress=False)
    assert result.bad_records == [f"{path}:1: empty assistant message (turn 2 of 2)"]
    assert shard_info(tmp_path / "t")["num_records"] == 1

@pytest.mark.parametrize("workers", [1, 2])
def test_raw_lines_that_cannot_be_read_are_reported_with_their_reason(setup, tmp_path, workers):
    """A user's raw file given to stage 3 (or stages 4, 5, 9 via --data_path): a GBK line and a .gz cut short are
    bad records that say what they are; the rest is tokenized (a GBK line was decoded into replacement characters)."""
    import gzip

    _, tokenizer_dir, _ = setup
    lines = [json.dumps({"text": f"河流流过古老的磨坊，第 {i} 天。"}, ensure_ascii=False).encode() for i in range(4)]
    lines[2] = lines[2].decode().encode("gbk")
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    packed = gzip.compress("".join(json.dumps({"text": f"Document {i} about rivers."}) + "\n"
                                   for i in range(3000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    result = build_shards("pretrain", [tmp_path / "mixed.jsonl", tmp_path / "cut.jsonl.gz"], tokenizer_dir,
                          tmp_path / "t", workers=workers, progress=False)
    assert result.bad_records[0].startswith(f"{tmp_path / 'mixed.jsonl'}:3: ") and "not UTF-8" in result.bad_records[0]
    assert result.bad_records[-1].startswith(f"{tmp_path / 'cut.jsonl.gz'}:")
    assert "the compressed file is cut short here" in result.bad_records[-1]
    assert shard_info(tmp_path / "t")["num_records"] > 3 + 1000  # the lines before the cut (1,500 or so)



def test_a_utf16_jsonl_file_is_refused_with_what_to_do(setup, tmp_path):
    _, tokenizer_dir, _ = setup
    path = tmp_path / "utf16.jsonl"
    lines = "".join(json.dumps({"text": f"Document {i} about rivers."}) + "\n" for i in range(3))
    path.write_bytes(lines.encode("utf-16"))
    with pytest.raises(DataError, match=r"utf16.jsonl: UTF-16 text, not UTF-8; save the file as UTF-8"):
        build_shards("pretrain", [path], tokenizer_dir, tmp_path / "t", workers=1, progress=False)

def test_readers_reject_wrong_kind_and_missing_dir(setup, tmp_path):
    root, tokenizer_dir, _ = setup
    build_shards("dpo", [root / "raw/dpo.jsonl"], tokenizer_dir, tmp_path / "d", workers=1, progress=False)
    with pytest.raises(DataError, match="holds dpo shards"):
        SFTTokens(tmp_path / "d", 32)
    with pytest.raises(DataError, match="no index.json"):
        PretrainTokens(tmp_path / "nothing", 32)


def test_cli_all_mode_and_errors(setup, tmp_path):
    root, tokenizer_dir, _ = setup
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft_train.jsonl").write_bytes((root / "raw/sft.jsonl").read_bytes())
    (data / "dpo_val.jsonl").write_bytes((root / "raw/dpo.jsonl").read_bytes())
    results = build_all(data, tokenizer_dir, tmp_path / "tokens", workers=1, progress=False)
    assert sorted(str(r.out_dir.relative_to(tmp_path)) for r in results) == ["tokens/dpo/val", "tokens/sft/train"]
    run = subprocess.run([sys.executable, str(ROOT / "3.dataset.py"), "--kind", "sft", "--input",
                          str(tmp_path / "missing.jsonl"), "--tokenizer", str(tokenizer_dir), "--out_dir",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.strip() == f"error: {tmp_path / 'missing.jsonl'}: no such file or directory"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    run = subprocess.run([sys.executable, str(ROOT / "3.dataset.py"), "--kind", "sft", "--input",
                          str(data / "sft_train.jsonl"), "--tokenizer", str(broken), "--out_dir", str(tmp_path / "x")],
                         capture_output=True, text=True)
    said = run.stderr.strip()
    assert run.returncode != 0 and "\n" not in said
    assert said.startswith(f"error: {broken / 'tokenizer.json'}: not a readable tokenizer.json: EOF while parsing")


def test_all_removes_the_shards_of_files_stage_2_no_longer_writes(setup, tmp_path, capsys):
    """Stage 2 replaces all of an earlier run's files: out/tokens/dpo/train, left from a run with preference pairs,
    would have been trained on after a run without them."""
    from mateconv.data.tokenizing import main

    root, tokenizer_dir, _ = setup
    data, tokens = tmp_path / "data", tmp_path / "tokens"
    data.mkdir()
    (data / "sft_train.jsonl").write_bytes((root / "raw/sft.jsonl").read_bytes())
    (data / "dpo_train.jsonl").write_bytes((root / "raw/dpo.jsonl").read_bytes())
    command = ["--all", "--data_dir", str(data), "--out_root", str(tokens), "--tokenizer", str(tokenizer_dir),
               "--workers", "1", "--no_progress"]
    main(command)
    (data / "dpo_train.jsonl").unlink()  # stage 2 again, without preference pairs
    (tokens / "dpo" / "mine").mkdir()  # not a split's shards: kept
    other = ["--all", "--data_dir", str(tmp_path / "other"), *command[3:]]  # another data directory's run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sft_val.jsonl").write_bytes((root / "raw/sft.jsonl").read_bytes())
    main(other)
    assert (tokens / "dpo" / "train" / "index.json").is_file()  # made from data/, not other/: kept
    main(command)
    assert not (tokens / "dpo" / "train").exists() and (tokens / "dpo" / "mine").is_dir()
    assert (tokens / "sft" / "train" / "index.json").is_file()
    assert (f"{tokens / 'dpo' / 'train'}: removed, as {data} has no dpo_train.jsonl any more (stage 2 did not write "
            "it this time)") in capsys.readouterr().out


def test_kill_2_stops_a_background_job_of_a_script_and_the_same_command_goes_on(setup, tmp_path):
    """3.dataset.py started as `bash -c 'nohup ... &'` (SIGINT comes ignored there): `kill -2` ends it with one line
    and no worker tracebacks, its finished shards kept; the same command then does the rest, every record once.
    Before, kill -2 was ignored and tokenizing went on to the end; `kill` left BrokenPipe tracebacks."""
    root, tokenizer_dir, _ = setup
    lines = (root / "raw/pretrain.jsonl").read_text().splitlines()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", lines * 400)
    out, log = tmp_path / "tokens", tmp_path / "tokenize.log"
    command = (f"{sys.executable} {ROOT / '3.dataset.py'} --kind pretrain --input {corpus} --tokenizer {tokenizer_dir}"
               f" --out_dir {out} --workers 2 --records_per_shard 200 --chunk_records 50")
    started = subprocess.run(["bash", "-c", f"nohup {command} > {log} 2>&1 & echo $!"], capture_output=True,
                             text=True, check=True)
    pid = int(started.stdout)
    deadline = time.time() + 60
    while not list(out.glob("part-00001*")) and time.time() < deadline:  # a shard or two finished
        time.sleep(0.05)
    os.kill(pid, signal.SIGINT)
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    assert "tokenize: interrupted; the finished shards are kept" in text and "Traceback" not in text, text[-2000:]
    partial = json.loads((out / "index.json").read_text())
    assert not partial["complete"]
    rerun = subprocess.run(command.split(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "shard(s) already done" in rerun.stdout
    assert shard_info(out)["num_records"] == len(lines) * 400


def test_a_json_array_under_a_jsonl_name_is_tokenized(setup, tmp_path):
    _, tokenizer_dir, _ = setup
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(5)]
    (tmp_path / "alpaca.jsonl").write_text(json.dumps(records, indent=2))
    result = build_shards("sft", [tmp_path / "alpaca.jsonl"], tokenizer_dir, tmp_path / "t", workers=1, progress=False)
    assert not result.bad_records and shard_info(tmp_path / "t")["num_records"] == 5


def test_a_worker_killed_is_one_line_and_the_same_command_goes_on(setup, tmp_path):
    """A tokenizing worker killed (as the kernel's out-of-memory killer does) ends the run with one line, its finished
    shards kept; the same command then does the rest. With multiprocessing.Pool the run waited for ever for the
    killed worker's chunk."""
    root, tokenizer_dir, _ = setup
    lines = (root / "raw/pretrain.jsonl").read_text().splitlines()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", lines * 400)
    out = tmp_path / "tokens"
    command = [sys.executable, str(ROOT / "3.dataset.py"), "--kind", "pretrain", "--input", str(corpus), "--tokenizer",
               str(tokenizer_dir), "--out_dir", str(out), "--workers", "2", "--records_per_shard", "200",
               "--chunk_records", "50"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.glob("part-00001*")) and time.time() < deadline:  # a shard or two finished
        time.sleep(0.05)
    psutil.Process(process.pid).children()[0].kill()
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run waited for the killed worker")
    assert process.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: a tokenizing worker died"), stderr[-2000:]
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "shard(s) already done" in rerun.stdout, rerun.stderr[-2000:]
    assert shard_info(out)["num_records"] == len(lines) * 400
