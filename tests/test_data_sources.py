"""Recognising the files of a user's data directory (mateconv/data/sources.py): kind, format, records, and the
broken lines stage 2 skips and reports with file:line."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mateconv.data import DataError
from mateconv.data.prepare import main as prepare_main
from mateconv.data.prepare import prepare, summary_table
from mateconv.data.readers import list_files
from mateconv.data.sources import by_kind, readable_size, scan

USER, BOT = {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}
WRONG = {"role": "assistant", "content": "Berlin, I think."}
RECORDS = {  # file name -> (one record, expected kind, expected format)
    "pretrain_hq.jsonl": ({"text": "A long enough paragraph of pretraining text about rivers."}, "pretrain",
                          "jsonl 'text' field"),
    "minimind_sft.jsonl": ({"conversations": [USER, BOT]}, "sft", "MiniMind conversations"),
    "alpaca.json": ({"instruction": "Name the capital.", "input": "France", "output": "Paris."}, "sft", "Alpaca"),
    "trl_sft.jsonl": ({"prompt": "Name the capital of France.", "completion": "Paris."}, "sft",
                      "TRL prompt/completion"),
    "sharegpt.jsonl": ({"conversations": [{"from": "human", "value": "Hi there, who are you?"},
                                          {"from": "gpt", "value": "An assistant."}], "system": "Be brief."},
                       "sft", "ShareGPT conversations, with system turns"),
    "openai.jsonl": ({"messages": [{"role": "system", "content": "Be brief."}, USER, BOT]}, "sft",
                     "OpenAI messages, with system turns"),
    "minimind_dpo.jsonl": ({"chosen": [USER, BOT], "rejected": [USER, WRONG]}, "dpo",
                           "MiniMind/TRL chosen/rejected messages"),
    "trl.jsonl": ({"prompt": [USER], "chosen": [BOT], "rejected": [WRONG]}, "dpo", "TRL prompt/chosen/rejected"),
    "factory_dpo.json": ({"conversations": [{"from": "human", "value": USER["content"]}],
                          "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Rome."}},
                         "dpo", "LLaMA-Factory dpo"),
    "factory_ranking.json": ({"instruction": "Name the capital.", "input": "France", "chosen": "Paris.",
                              "rejected": "Rome."}, "dpo", "Alpaca preference (LLaMA-Factory ranking)"),
    "hh.jsonl": ({"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
                  "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Rome."}, "dpo", "hh-rlhf transcripts"),
    "tasks.jsonl": ({"id": "t1", "kind": "add", "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
                     "answer": "5"}, "tasks", "verifiable tasks"),
}


def write(path: Path, records: list, broken_at: int | None = None) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if broken_at is not None:
        lines.insert(broken_at - 1, '{"text": "cut off')
    path.write_text(json.dumps(records) if path.suffix == ".json" else "\n".join(lines) + "\n")


def test_every_format_is_recognised_with_its_size(tmp_path):
    for name, (record, _, _) in RECORDS.items():
        write(tmp_path / name, [record] * 3)
    (tmp_path / "book.txt").write_text("First paragraph of the book.\n\nSecond paragraph.\n")
    pq.write_table(pa.table({"text": ["one document", "another document"], "source": ["a", "b"]}),
                   tmp_path / "web.parquet")
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / ".hidden.jsonl").write_text("{}\n")
    (tmp_path / "weird.jsonl").write_text(json.dumps({"foo": 1}) + "\n")

    found = {f.path.name: f for f in scan(tmp_path)}
    assert ".hidden.jsonl" not in found
    for name, (_, kind, form) in RECORDS.items():
        size = (tmp_path / name).stat().st_size
        assert (found[name].kind, found[name].format, found[name].size) == (kind, form, size), name
    assert (found["book.txt"].kind, found["book.txt"].format) == ("pretrain", "plain text")
    assert (found["web.parquet"].kind, found["web.parquet"].format) == ("pretrain", "parquet 'text' field")
    assert found["README.md"].kind is None and "not a .jsonl/.json/.txt/.parquet file" in found["README.md"].line()
    assert found["weird.jsonl"].kind is None
    assert f"{tmp_path / 'weird.jsonl'}:1: unknown record shape" in found["weird.jsonl"].format
    assert found["minimind_sft.jsonl"].line() == \
        f"{tmp_path / 'minimind_sft.jsonl'} → sft, MiniMind conversations, 381 bytes"
    assert [len(v) for v in by_kind(list(found.values())).values()] == [3, 5, 5, 1]  # pretrain, sft, dpo, tasks


def test_content_decides_and_a_misleading_name_is_noted(tmp_path):
    write(tmp_path / "dpo_extra.jsonl", [RECORDS["alpaca.json"][0]] * 2 + [RECORDS["hh.jsonl"][0]])
    (found,) = scan(tmp_path)
    assert found.kind == "sft" and "named like dpo data but holds sft records" in found.line()


def test_broken_lines_are_skipped_and_reported_with_file_and_line(tmp_path):
    docs = [{"text": f"Document number {i} talks about rivers, stones and the morning light."} for i in range(8)]
    write(tmp_path / "pretrain.jsonl", docs, broken_at=4)
    write(tmp_path / "sft.jsonl", [RECORDS["minimind_sft.jsonl"][0], {"conversations": [USER]}])  # no assistant turn
    files = scan(tmp_path)
    assert [f.kind for f in files] == ["pretrain", "sft"]
    stats = prepare({kind: [f.path for f in found] for kind, found in by_kind(files).items()}, tmp_path / "out",
                    val_frac=0.0, progress=False)
    assert stats["pretrain"]["kept"] == 8 and stats["sft"]["kept"] == 1
    report = summary_table(stats)
    assert f"{tmp_path / 'pretrain.jsonl'}:4: malformed JSON" in report
    assert f"{tmp_path / 'sft.jsonl'}:2: conversation does not end with an assistant turn" in report


def test_a_null_field_is_named_as_null_not_as_missing(tmp_path):
    docs = [{"text": f"Document number {i} talks about rivers, stones and the morning light."} for i in range(3)]
    write(tmp_path / "pretrain.jsonl", docs + [{"text": None}])
    write(tmp_path / "nulls.jsonl", [{"text": None}])
    write(tmp_path / "sft.jsonl", [RECORDS["minimind_sft.jsonl"][0], {"messages": None}])
    write(tmp_path / "dpo.jsonl", [{"chosen": None, "rejected": "\n\nHuman: Hi\n\nAssistant: What?"}])
    files = {f.path.name: f for f in scan(tmp_path)}
    assert "'text' must be a string or a list of strings, got null" in files["nulls.jsonl"].line()
    stats = prepare({kind: [f.path for f in found] for kind, found in by_kind(list(files.values())).items()},
                    tmp_path / "out", val_frac=0.0, progress=False)
    report = summary_table(stats)
    assert "pretrain.jsonl:4: 'text' must be a string or a list of strings, got null" in report
    assert "sft.jsonl:2: a conversation must be a list of messages, got null" in report
    assert "dpo.jsonl:1: chosen must be a list of messages, got null" in report


def test_sft_prompts_are_held_out_of_sft_training(tmp_path):
    conversations = [{"messages": [{"role": "user", "content": f"Question {i} about the weather today?"},
                                   {"role": "assistant", "content": f"Answer {i}: sunny."}]} for i in range(200)]
    write(tmp_path / "sft.jsonl", conversations)
    stats = prepare({"sft": [tmp_path / "sft.jsonl"]}, tmp_path / "out", val_frac=0.1, prompts_frac=0.2,
                    max_prompts=25, progress=False)
    held = [json.loads(line) for line in (tmp_path / "out/sft_prompts.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (tmp_path / "out/sft_train.jsonl").read_text().splitlines()]
    assert len(held) == stats["sft"]["prompts"] == 25  # 20% of ~180 is more than the cap
    assert stats["sft"]["train"] + stats["sft"]["val"] + 25 == 200
    assert not {r["id"] for r in held} & {r["id"] for r in train}


def test_a_missing_or_empty_directory_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="nope: no such file or directory$"):
        scan(tmp_path / "nope")
    with pytest.raises(DataError, match="the directory is empty"):
        scan(tmp_path)


def test_a_kto_file_is_skipped_with_the_reason(tmp_path):
    kto = tmp_path / "kto.jsonl"
    write(kto, [{"messages": [USER, BOT], "label": True}, {"messages": [USER, WRONG], "label": False}])
    [found] = scan(tmp_path)
    assert found.kind is None
    assert found.format.startswith(f"not recognised ({kto}:1: KTO feedback ('label': true) is not supported")


def test_files_in_linked_directories_are_found_and_a_link_cycle_ends(tmp_path):
    corpora, data = tmp_path / "corpora", tmp_path / "data"
    corpora.mkdir()
    data.mkdir()
    write(corpora / "sft.jsonl", [RECORDS["minimind_sft.jsonl"][0]] * 2)
    write(data / "pretrain.jsonl", [RECORDS["pretrain_hq.jsonl"][0]])
    (data / "linked").symlink_to(corpora, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)
    assert [(f.path, f.kind) for f in scan(data)] == [(data / "linked/sft.jsonl", "sft"),
                                                       (data / "pretrain.jsonl", "pretrain")]
    assert list_files([data]) == [data / "linked/sft.jsonl", data / "pretrain.jsonl"]


def test_a_gbk_file_is_skipped_with_its_first_bad_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("第一段文字。\n第二段文字。\n".encode("gbk"))
    [found] = scan(tmp_path)
    assert found.kind is None
    assert found.line().startswith(f"{path} → skipped: not recognised (2 bad lines, the first {path}:1: invalid ")
    assert "not UTF-8 text; save the file as UTF-8" in found.line()


def test_a_git_lfs_pointer_is_skipped_with_what_to_do(tmp_path):
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 1048576\n".format("0" * 64)
    for name in ("train.parquet", "sft.jsonl", "dpo.json.gz"):
        (tmp_path / name).write_text(pointer)
    for found in scan(tmp_path):
        assert found.kind is None
        assert found.format == f"{found.path}: a Git LFS pointer, not the data: fetch the file (`git lfs pull` in its clone)"


@pytest.mark.parametrize("name", ["notes.txt", "chat.jsonl", "pairs.json.gz"])
def test_a_utf16_file_is_skipped_with_what_to_do(tmp_path, name):
    # what Windows PowerShell's `>` and Notepad's "Unicode" write: read as UTF-8 its ASCII survives between NULs
    text = json.dumps({"text": "床前明月光，疑是地上霜。The river runs by the mill."}, ensure_ascii=False) + "\n"
    data = (text * 5).encode("utf-16")
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    [found] = scan(tmp_path)
    assert found.kind is None
    assert found.format == (f"{tmp_path / name}: UTF-16 text, not UTF-8; save the file as UTF-8 "
                            f"(`iconv -f UTF-16 -t UTF-8 FILE > NEW`)")


def test_an_upper_case_gz_name_is_read_as_gzip(tmp_path):
    lines = "".join(json.dumps({"text": f"Document {i} about the old mill by the river."}) + "\n" for i in range(5))
    (tmp_path / "CORPUS.JSONL.GZ").write_bytes(gzip.compress(lines.encode()))
    [found] = scan(tmp_path)
    assert (found.kind, found.format) == ("pretrain", "jsonl 'text' field")


def test_a_multimodal_file_is_skipped_with_the_reason(tmp_path):
    """LLaMA-Factory's mllm_demo.json (and LLaVA's `image`) beside its text data: its <image> placeholders trained as
    words, about pictures the model never sees."""
    mllm = tmp_path / "mllm_demo.json"
    mllm.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>Who are they?"}, BOT],
                                 "images": ["mllm_demo_data/1.jpg"]}]))
    [found] = scan(tmp_path)
    assert found.kind is None
    assert found.format == (f"not recognised ({mllm}:1: 'images' holds media: a text-only model would train on its "
                            "placeholders (<image>, <video>, <audio>) as words; keep the records without media)")


def test_a_tokenizer_directory_beside_the_data_is_not_read_as_data(tmp_path):
    """MiniMind's tokenizer folder kept in the data directory: its merges.txt became pretraining text, and its JSON
    files each a long "unknown record shape" line."""
    tokenizer = tmp_path / "minimind_tokenizer"
    tokenizer.mkdir()
    (tokenizer / "merges.txt").write_text("#version: 0.2\nĠ t\nĠ a\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "model_max_length": 32768}))
    (tmp_path / "pretrain_hq.jsonl").write_text(json.dumps({"text": "Rivers run to the sea."}) + "\n")
    found = {f.path.name: f for f in scan(tmp_path)}
    assert found["pretrain_hq.jsonl"].kind == "pretrain"
    for name in ("merges.txt", "tokenizer_config.json"):
        assert (found[name].kind, found[name].format) == (None, "a model's or tokenizer's file, not data (a tokenizer "
                                                                 "directory is used with --tokenizer DIR)")


def test_a_big_file_is_recognised_from_its_head(tmp_path):
    """A corpus of gigabytes is classified from its first records, not read to the end (which took minutes before
    the first stage ran); stage 2 reads, counts and reports the rest: here a tail of bad lines."""
    path = tmp_path / "corpus.jsonl"
    docs = [json.dumps({"text": f"Document {i} about the river and the mill."}) for i in range(100)]
    path.write_text("\n".join(docs + ['{"text": "cut off'] * 20_000) + "\n")
    [found] = scan(tmp_path)
    assert found.line() == f"{path} → pretrain, jsonl 'text' field, {readable_size(path.stat().st_size)}"
    assert readable_size(path.stat().st_size) == "365.4 KB" and readable_size(999) == "999 bytes"
    stats = prepare({"pretrain": [path]}, tmp_path / "out", val_frac=0.0, progress=False)
    assert (stats["pretrain"]["read"], stats["pretrain"]["removed"]["bad_record"]) == (20_100, 20_000)


def test_minimind_rl_prompts_are_skipped_with_the_reason(tmp_path):
    """MiniMind's dataset/ holds RL prompts beside its SFT data (rlaif.jsonl, agent_rl*.jsonl: conversations whose
    last assistant turn is left empty for the rollout). They were taken for SFT conversations, and stage 2 then
    skipped every record as a bad one, crowding the SFT file's own bad records out of its report."""
    prompt = {"conversations": [USER, {"role": "assistant", "content": ""}]}
    write(tmp_path / "rlaif.jsonl", [prompt] * 3)
    write(tmp_path / "agent_rl_math.jsonl", [{**prompt, "gt": "5"}] * 3)
    write(tmp_path / "sft_t2t_mini.jsonl", [RECORDS["minimind_sft.jsonl"][0], prompt])
    found = {f.path.name: f for f in scan(tmp_path)}
    for name in ("rlaif.jsonl", "agent_rl_math.jsonl"):
        assert found[name].line() == (f"{tmp_path / name} → skipped: not recognised ({tmp_path / name}:1: the last "
                                      "assistant turn is empty: a prompt for RL rollouts (as MiniMind's rlaif.jsonl), "
                                      "not an SFT conversation)")
    assert found["sft_t2t_mini.jsonl"].kind == "sft"


def test_a_file_whose_first_thousand_records_are_broken_is_read_on(tmp_path):
    """The scan classified a file from its first 1,000 records alone: a file opening with 1,000 broken lines (a
    botched export, a GBK header) was skipped, and the good records after them with it."""
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "sft.jsonl"
    good = [{"messages": [USER, {"role": "assistant", "content": f"Paris, answer {i}."}]} for i in range(3)]
    path.write_text('{"messages": [\n' * 1000 + "".join(json.dumps(record) + "\n" for record in good))
    [found] = scan(path.parent)
    assert (found.kind, found.format) == ("sft", "OpenAI messages")
    stats = prepare({"sft": [path]}, tmp_path / "out", val_frac=0, progress=False)
    assert (stats["sft"]["kept"], stats["sft"]["removed"]) == (3, {"bad_record": 1000})
    path.write_text('{"messages": [\n' * 1001)
    [found] = scan(path.parent)
    assert found.line() == (f"{path} → skipped: not recognised (1001 bad lines, the first {path}:1: malformed JSON: "
                            "Expecting value)")
    path.write_text('{"question": "?"}\n' * 1000 + "".join(json.dumps(record) + "\n" for record in good))
    [found] = scan(path.parent)  # readable records of no known shape: the file is of that shape, not read on
    assert found.line().startswith(f"{path} → skipped: not recognised ({path}:1: unknown record shape with keys "
                                   "['question']")


def factory_dir(tmp_path: Path) -> Path:
    """A LLaMA-Factory data directory whose dataset_info.json renames every column and sharegpt's role names."""
    info = {
        "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "response": "answer", "system": "sys"}},
        "chats": {"file_name": "chats", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                  "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "client",
                           "assistant_tag": "agent", "system_tag": "rules"}},
        "pairs": {"file_name": "pairs.jsonl", "ranking": True, "columns": {"prompt": "q", "chosen": "good",
                                                                            "rejected": "bad"}},
        "corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "body"}},
        "odd": {"file_name": "odd.json", "formatting": "openai"},
        "gone": {"file_name": "gone.json"},
        **{f"hub_{i}": {"hf_hub_url": f"someone/set_{i}"} for i in range(300)},
    }
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "dataset_info.json").write_text(json.dumps(info, indent=2))
    write(tmp_path / "qa.json", [{"question": "Name the capital of France.", "answer": "Paris.", "sys": "Be brief."}])
    (tmp_path / "chats").mkdir()
    write(tmp_path / "chats" / "part1.jsonl", [{"dialog": [
        {"speaker": "rules", "text": "You are a guide."}, {"speaker": "client", "text": "Where is the Louvre?"},
        {"speaker": "agent", "text": "In Paris, on the Right Bank."}]}])
    write(tmp_path / "pairs.jsonl", [{"q": "Capital of Italy?", "good": "Rome.", "bad": "Milan."}])
    write(tmp_path / "corpus.jsonl", [{"body": "The river runs past the old mill and into the sea.", "url": "x"}])
    write(tmp_path / "odd.json", [RECORDS["alpaca.json"][0]])
    return tmp_path


def test_llama_factory_dataset_info_columns_and_tags_are_used(tmp_path):
    """LLaMA-Factory users describe their files in dataset_info.json: custom column names, sharegpt's role names,
    ranking for pairs. The scan only noted that the file was there, so each of these files was skipped as an unknown
    record shape."""
    root = factory_dir(tmp_path)
    lines = [found.line() for found in scan(root)]
    info = root / "dataset_info.json"
    assert lines == [
        f"{root / 'chats/part1.jsonl'} → sft, ShareGPT conversations, with system turns (as dataset_info.json entry "
        f"'chats' describes it), 180 bytes",
        f"{root / 'corpus.jsonl'} → pretrain, jsonl 'text' field (as dataset_info.json entry 'corpus' describes it), "
        "75 bytes",
        f"{info} → skipped: LLaMA-Factory's list of data sets, not data: its entries say how to read the 4 files or "
        "folders here that they name",
        f"{info} → skipped: entry 'odd': formatting 'openai' is not alpaca or sharegpt: odd.json is read by its "
        "content instead",
        f"{info} → skipped: entries on a hub or made by a script, not read (download the files into the directory "
        "and name them in file_name): hub_0, hub_1, hub_2, hub_3, hub_4 and 295 more",
        f"{info} → skipped: entries whose file_name is not there: gone",
        f"{root / 'odd.json'} → sft, Alpaca, 77 bytes",
        f"{root / 'pairs.jsonl'} → dpo, Alpaca preference (LLaMA-Factory ranking) (as dataset_info.json entry "
        "'pairs' describes it), 61 bytes",
        f"{root / 'qa.json'} → sft, Alpaca, with system turns (as dataset_info.json entry 'qa' describes it), 85 bytes"]
    prepare({kind: [f.path for f in found] for kind, found in by_kind(scan(root)).items()}, tmp_path / "out",
            val_frac=0, progress=False)
    rows = {kind: [json.loads(line) for line in (tmp_path / "out" / f"{kind}_train.jsonl").open()]
            for kind in ("pretrain", "sft", "dpo")}
    assert [row["text"] for row in rows["pretrain"]] == ["The river runs past the old mill and into the sea."]
    assert [row["messages"] for row in rows["sft"]] == [
        [{"role": "system", "content": "You are a guide."}, {"role": "user", "content": "Where is the Louvre?"},
         {"role": "assistant", "content": "In Paris, on the Right Bank."}],
        [{"role": "user", "content": "Name the capital.\nFrance"}, {"role": "assistant", "content": "Paris."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name the capital of France."},
         {"role": "assistant", "content": "Paris."}]]
    assert [(row["prompt"], row["chosen"], row["rejected"]) for row in rows["dpo"]] == [
        ([{"role": "user", "content": "Capital of Italy?"}], [{"role": "assistant", "content": "Rome."}],
         [{"role": "assistant", "content": "Milan."}])]


def test_stage2_raw_dir_takes_the_kinds_dataset_info_json_gives(tmp_path, capsys):
    """The files that neither an entry nor their name (pretrain*, sft*, ...) gives a kind are read by their content,
    as with --data: they were left out without a word (LLaMA-Factory's wiki_demo.txt, and odd.json here, which the
    note on its entry said was read by its content)."""
    root = factory_dir(tmp_path / "raw")
    (root / "wiki_demo.txt").write_text("An article about rivers, stones and the light of the morning.\n")
    write(root / "questions.jsonl", [{"question": "?"}])
    prepare_main(["--raw_dir", str(root), "--out_dir", str(tmp_path / "out"), "--val_frac", "0", "--no_progress"])
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert {kind: stats[kind]["kept"] for kind in ("pretrain", "sft", "dpo")} == {"pretrain": 2, "sft": 3, "dpo": 1}
    err = capsys.readouterr().err
    assert "entry 'odd': formatting 'openai' is not alpaca or sharegpt" in err
    assert f"{root / 'questions.jsonl'} → skipped: not recognised ({root / 'questions.jsonl'}:1: unknown record " in err


def test_malformed_dataset_info_json_is_one_line_with_file_and_line(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "qa": {"file_name": "qa.json",}\n}\n')
    write(tmp_path / "qa.json", [RECORDS["alpaca.json"][0]])
    with pytest.raises(DataError, match=f"^{tmp_path / 'dataset_info.json'}:2: malformed JSON: Expecting property "
                                        "name enclosed in double quotes$"):
        scan(tmp_path)


def test_template_placeholders_are_noted(shared_data, tmp_path):
    """LLaMA-Factory's identity.json answers "I am {{name}}, an AI assistant developed by {{author}}": its README asks
    to fill the placeholders in first; taken as it is, the model learnt to call itself {{name}}, and nothing said so."""
    identity = tmp_path / "identity.json"
    identity.write_bytes(shared_data("hiyouga__LLaMA-Factory/data/identity.json").read_bytes())
    [found] = scan(tmp_path)
    assert found.line() == (f"{identity} → sft, Alpaca, 20.3 KB; holds template placeholders ({{{{author}}}}, "
                            "{{name}}), which would train as they are: fill them in first")


def test_dataset_info_entry_with_extra_columns_is_used_and_unhonoured_keys_are_noted(tmp_path):
    """LLaMA-Factory ignores the columns an entry lists that its formatting does not use, so this entry (a sharegpt
    `messages` column and a `score` on an alpaca entry) was read by the file's content instead, its renamed columns
    lost. `num_samples` and `split` were dropped without a word."""
    info = {"qa": {"file_name": "qa.json", "num_samples": 500, "split": "test",
                   "columns": {"prompt": "question", "response": "answer", "messages": "chat", "score": "rating"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    write(tmp_path / "qa.json", [{"question": "Name the capital of France.", "answer": "Paris.", "rating": 3}])
    lines = [found.line() for found in scan(tmp_path)]
    path = tmp_path / "dataset_info.json"
    assert lines[1:] == [
        f"{path} → skipped: entry 'qa': num_samples 500 is not honoured: every record of qa.json is read once",
        f"{path} → skipped: entry 'qa': split 'test' is not honoured: a local file has only its train split, which "
        "is read",
        f"{tmp_path / 'qa.json'} → sft, Alpaca (as dataset_info.json entry 'qa' describes it), 78 bytes"]
