"""Stage 2: cleaning, filters, exact/near dedup, stable split, stats.json, bad records, the notebook."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from nbclient.exceptions import CellExecutionError

from mateconv.data import DataError
from mateconv.data.clean import DEFAULT_NORMALIZATION, Deduper, Filters, normalize, split_of
from mateconv.data.prepare import build_parser, main, prepare, summary_table
from mateconv.data.tokenizing import build_shards
from mateconv.prefs.store import sample_prompts
from tests.test_data_formats import GOOD_PAIRS, write_pairs_file
from tests.test_tokenizer_notebook import run_notebook

ROOT = Path(__file__).resolve().parents[1]


def prose(seed: int, words: int = 120) -> str:
    rng = random.Random(seed)
    vocab = ["river", "stone", "light", "morning", "garden", "quiet", "bright", "window", "letter", "music", "road",
             "winter", "paper", "silver", "forest", "harbor", "candle", "yellow", "distant", "market"]
    return " ".join(rng.choice(vocab) for _ in range(words)) + "."


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_normalize_and_filters():
    text = "Ｈｅｌｌｏ\u200b，世界\x07\r\n\r\n\r\n\r\nnext  \nline"
    assert normalize(text) == "Ｈｅｌｌｏ，世界\n\nnext\nline"  # NFC: Chinese punctuation stays as it is written
    assert normalize(text, "NFKC") == "Hello,世界\n\nnext\nline"
    assert normalize("e\u0301", "NFC") == "\u00e9" and normalize("ｆｕｌｌ", "none") == "ｆｕｌｌ"
    # joiners are part of the text: an emoji sequence (a family, not three people) and Persian words keep theirs
    assert normalize("家庭👨\u200d👩\u200d👧，خواهم می\u200cروم") == "家庭👨\u200d👩\u200d👧，خواهم می\u200cروم"
    filters = Filters(min_chars=5, max_chars=1000)
    assert filters.reason("abc") == "too_short"
    assert filters.reason("x y" * 1001, pretraining=False) == "too_long"  # a conversation or pair
    assert filters.reason(prose(2, 400)) is None  # a long pretraining document counts in full
    assert filters.reason("the same spam line again\n" * 20) == "repetitive"
    assert filters.reason("buy now " * 60) == "repetitive"  # one long line: caught by the compression ratio
    # a ci with its refrain (长相思): 22 of the 21,250 ci were dropped when each line's first time counted too, 4 now
    assert filters.reason("长相思。\n长相思。\n若问相思甚了期。\n除非相见时。\n长相思。\n长相思。\n欲把相思说似谁。\n"
                          "浅情人不知。") is None
    assert filters.reason(prose(1, 100)) is None


def test_a_file_with_few_bad_records_is_shown_beside_a_noisy_one(tmp_path):
    """The bad records shown are the first 20 and then each other file's first: a file cut short (or saved as GBK)
    was hidden behind a noisy file's 20 bad lines, counted but never named."""
    noisy, cut = tmp_path / "noisy.jsonl", tmp_path / "cut.jsonl"
    noisy.write_text("".join(json.dumps({"text": prose(i)}) + "\n{broken\n" for i in range(25)))
    cut.write_text(json.dumps({"text": prose(99)}) + '\n{"text": "the download stopped he')
    stats = prepare({"pretrain": [noisy, cut]}, tmp_path / "data", progress=False, workers=1)["pretrain"]
    assert stats["removed"]["bad_record"] == 26 and stats["kept"] == 26
    assert len(stats["bad_examples"]) == 21 and stats["bad_examples"][-1].startswith(f"{cut}:2: malformed JSON")
    assert "pretrain: 26 bad record(s) skipped (the first 20 below, then the first in each other file):" in \
        summary_table({"pretrain": stats})

def test_dedup_removes_exact_and_near_duplicates():
    deduper = Deduper(threshold=0.8)
    original = prose(3)
    near = original.replace("river", "rivers", 2) + " extra"
    assert deduper.check(original) is None
    assert deduper.check(original) == "exact_dup"
    assert deduper.check(near) == "near_dup"
    assert deduper.check(prose(4)) is None  # same vocabulary, different text
    short = Deduper(threshold=0.5)
    assert short.check("What is 7 plus 5?") is None and short.check("What is 7 plus 6?") is None  # short: exact only


def test_split_is_stable_and_near_the_fraction():
    keys = [f"doc {i}" for i in range(4000)]
    splits = [split_of(k, 0.1, seed=3) for k in keys]
    assert splits == [split_of(k, 0.1, seed=3) for k in keys]
    assert 0.08 < splits.count("val") / len(keys) < 0.12
    assert splits != [split_of(k, 0.1, seed=4) for k in keys]


def test_prepare_writes_split_files_and_stats(tmp_path):
    docs = [prose(i) for i in range(60)]
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps({"text": d}) for d in docs]
    lines += [json.dumps({"text": docs[0]}), json.dumps({"text": docs[1].replace("stone", "stones", 3)}),
              "{broken", json.dumps({"text": "tiny"}), json.dumps({"title": "no text"}),
              json.dumps({"text": "spam spam spam spam\n" * 30})]
    (raw / "pretrain.jsonl").write_text("\n".join(lines) + "\n")
    (raw / "extra.txt").write_text("First paragraph of the text file, long enough.\n\nSecond paragraph here, also ok.\n")
    sft = [{"instruction": "Say hi", "input": "", "output": "hi"},
           {"conversations": [{"from": "human", "value": "Ｑ１"}, {"from": "gpt", "value": "Ａ１"}], "split": "val"},
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}]
    (raw / "sft.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in sft) + "\n")
    stats = prepare({"pretrain": [raw / "pretrain.jsonl", raw / "extra.txt"], "sft": [raw / "sft.jsonl"]},
                    tmp_path / "data", val_frac=0.2, filters=Filters(min_chars=5), progress=False)
    pre = stats["pretrain"]
    assert pre["read"] == 68 and pre["removed"] == {"bad_record": 2, "exact_dup": 1, "near_dup": 1,
                                                    "repetitive": 1, "too_short": 1}
    assert pre["kept"] == 62 == pre["train"] + pre["val"] and pre["val"] > 0
    assert pre["bad_examples"][0] == f"{raw / 'pretrain.jsonl'}:63: malformed JSON: Expecting property name " \
                                     "enclosed in double quotes"
    on_disk = json.loads((tmp_path / "data/stats.json").read_text())
    assert on_disk["pretrain"]["removed"] == pre["removed"] and on_disk["settings"]["val_frac"] == 0.2
    written = read(tmp_path / "data/pretrain_train.jsonl") + read(tmp_path / "data/pretrain_val.jsonl")
    assert len(written) == 62 and len({r["id"] for r in written}) == 62
    assert read(tmp_path / "data/sft_val.jsonl")[0]["messages"][0] == {"role": "user", "content": "Ｑ１"}  # split kept
    assert stats["sft"]["removed"] == {"bad_record": 1}
    assert stats["sft"]["bad_examples"] == [f"{raw / 'sft.jsonl'}:3: empty assistant message (turn 2 of 2)"]
    again = prepare({"pretrain": [raw / "pretrain.jsonl", raw / "extra.txt"]}, tmp_path / "again", val_frac=0.2,
                    filters=Filters(min_chars=5), progress=False)
    assert again["pretrain"]["val"] == pre["val"]
    assert read(tmp_path / "again/pretrain_val.jsonl") == read(tmp_path / "data/pretrain_val.jsonl")


def write_sources(tmp_path) -> dict[str, Path]:
    """A pretraining file, a second one, and an SFT file, each of a few records."""
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("pretrain", "other_pretrain", "sft")}
    paths["pretrain"].write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(20)))
    paths["other_pretrain"].write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(20, 40)))
    paths["sft"].write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                              {"role": "assistant", "content": prose(i, 12)}]}) + "\n"
                                    for i in range(20)))
    return paths


def test_a_rerun_on_other_kinds_leaves_no_file_of_the_first_run(tmp_path):
    """Notebook 2 on the demo data, then on the user's own pretraining text into the same out/data: the demo's SFT
    files stayed beside it, and stage 3 (--all) made SFT shards of them."""
    paths = write_sources(tmp_path)
    prepare({"pretrain": [paths["pretrain"]], "sft": [paths["sft"]]}, tmp_path / "data", progress=False,
            prompts_frac=0.2)
    prepare({"pretrain": [paths["other_pretrain"]]}, tmp_path / "data", progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "pretrain_train.jsonl", "pretrain_val.jsonl", "stats.json"]


def test_a_run_that_fails_leaves_the_earlier_outputs_as_they_were(tmp_path):
    """A missing SFT file stopped the run after it had replaced the pretraining files: out/data mixed two runs."""
    paths = write_sources(tmp_path)
    prepare({"pretrain": [paths["pretrain"]], "sft": [paths["sft"]]}, tmp_path / "data", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    with pytest.raises(DataError, match="no such file or directory"):
        prepare({"pretrain": [paths["other_pretrain"]], "sft": [tmp_path / "sfy.jsonl"]}, tmp_path / "data",
                progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before


def test_examples_sharing_a_long_system_prompt_or_passage_are_all_kept(tmp_path):
    """Distinct SFT examples with one long system prompt, and pairs over one passage, look alike to MinHash: only
    exact duplicates go (before, 183 of 200 such conversations were removed as near duplicates)."""
    persona = "You are the support assistant of a shop. " + prose(7, 120)
    sft = [{"system": persona, "instruction": f"Where is order #{i}?", "input": "", "output": f"Order #{i} ships on "
            f"day {i % 7}."} for i in range(60)]
    sft.append(dict(sft[0]))
    passage = prose(8, 150)
    dpo = [{"prompt": f"{passage}\nQuestion {i}: how many words?", "chosen": f"{i} words", "rejected": "none"}
           for i in range(30)]
    for name, records in (("sft", sft), ("dpo", dpo)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = prepare({"sft": [tmp_path / "sft.jsonl"], "dpo": [tmp_path / "dpo.jsonl"]}, tmp_path / "data",
                    progress=False)
    assert (stats["sft"]["kept"], stats["sft"]["removed"]) == (60, {"exact_dup": 1})
    assert (stats["dpo"]["kept"], stats["dpo"]["removed"]) == (30, {})


def test_prepare_real_shared_files(shared_data, tmp_path):
    files = {"sft": [shared_data("hiyouga__LLaMA-Factory/data/identity.json")],
             "dpo": [shared_data("hiyouga__LLaMA-Factory/data/dpo_en_demo.first50.json"),
                     shared_data("anthropics__hh-rlhf/harmless-base/test.first200.jsonl")],
             "pretrain": [shared_data("chinese-poetry__chinese-poetry/宋词/ci.song.0.first200.json")]}
    stats = prepare(files, tmp_path, progress=False)
    assert stats["sft"]["kept"] == 91
    assert stats["dpo"]["read"] == 250 and stats["dpo"]["removed"].get("bad_record", 0) == 1  # one empty hh reply
    pairs = read(tmp_path / "dpo_train.jsonl") + read(tmp_path / "dpo_val.jsonl")
    assert all(set(p) == {"id", "prompt", "chosen", "rejected"} and p["prompt"][-1]["role"] == "user" for p in pairs)
    poem = read(tmp_path / "pretrain_train.jsonl")[0]["text"]
    assert "\n" in poem and len(poem) > 20  # paragraphs joined line by line


def test_stage2_and_the_tokenizer_of_stages_3_and_9_skip_the_same_pairs(tiny_tokenizer, tmp_path):
    """Stage 9's --pairs_path FILE tokenizes with build_shards, as stage 3 does: same records kept, same lines."""
    expected = write_pairs_file(tmp_path / "dpo.jsonl")
    stats = prepare({"dpo": [tmp_path / "dpo.jsonl"]}, tmp_path / "data", progress=False)["dpo"]
    assert stats["bad_examples"] == expected and stats["kept"] == len(GOOD_PAIRS)
    tokenized = build_shards("dpo", [tmp_path / "dpo.jsonl"], tiny_tokenizer, tmp_path / "tokens", workers=1,
                             progress=False)
    assert tokenized.bad_records == expected and tokenized.index["shards"][0]["num_records"] == len(GOOD_PAIRS)


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main(["--pretrain", str(tmp_path / "nope.jsonl"), "--out_dir", str(tmp_path / "runs" / "o"), "--no_progress"])
    assert not (tmp_path / "runs").exists()  # a failed run leaves no new directory behind (it left an empty out_dir)
    with pytest.raises(SystemExit, match="hub is unreachable|could not load the data set from the hub"):
        main(["--sft", "hf:surely/not-a-dataset-xyz", "--out_dir", str(tmp_path / "o"), "--no_progress"])
    with pytest.raises(DataError, match="val_frac"):
        prepare({"pretrain": [tmp_path]}, tmp_path / "o", val_frac=1.5)


def test_prepare_notebook_on_embedded_data(tmp_path):
    run_notebook(ROOT / "2.prepare_data.ipynb", tmp_path, "\n".join([
        "from mateconv.data import embedded",
        "embedded.generate('out/raw/embedded', pretrain_chars=100_000, sft_conversations=300, dpo_pairs=100,"
        " train_tasks=30, val_tasks=30)",
        "raw_dir = 'out/raw/embedded'", "make_embedded_if_missing = True", "pretrain, sft, dpo, tasks = [], [], [], []",
        "out_dir = 'out/data'", "val_frac = 0.05", "seed = 0", "near_dup_threshold = 0.85", "min_chars = 10"]))
    stats = json.loads((tmp_path / "out/data/stats.json").read_text())
    assert stats["sft"]["read"] == 300 and stats["sft"]["val"] == 15  # the generator's own split is kept
    assert stats["tasks"]["kept"] == 60 and stats["tasks"]["val"] == 30
    for kind in ("pretrain", "sft", "dpo", "tasks"):
        assert (tmp_path / f"out/data/{kind}_train.jsonl").stat().st_size > 0


def notebook_parameters(name: str) -> tuple[dict, set[str]]:
    """A notebook's parameters cell run (its settings by name) and the names its other code cells read."""
    import ast

    import nbformat

    cells = [cell for cell in nbformat.read(ROOT / name, as_version=4).cells if cell.cell_type == "code"]
    settings: dict = {}
    exec(cells[0].source, settings)
    assert "parameters" in cells[0].metadata.tags
    read = {node.id for cell in cells[1:] for node in ast.walk(ast.parse(cell.source))
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return settings, read


def test_notebook_parameters_are_the_command_lines_settings():
    """The parameters cells hold every setting of stage 1's training and of `python -m mateconv.data.prepare`, with its
    defaults, and pass them on (both lacked the Unicode normalisation, which stages 1 and 2 must share, notebook 2 the
    filters and the stage 7 prompts)."""
    settings, read = notebook_parameters("2.prepare_data.ipynb")
    for name, default in vars(build_parser().parse_args([])).items():
        if name not in ("raw_dir", "no_progress"):  # the notebook's raw_dir is the demo data's
            assert settings[name] == default and name in read, name
    settings, read = notebook_parameters("1.tokenizer_training.ipynb")
    assert settings["normalization"] == DEFAULT_NORMALIZATION and "normalization" in read


def test_prepare_notebook_names_a_raw_dir_that_is_not_there(tmp_path):
    """A typo in raw_dir made that directory, wrote the demo data there and prepared it as if it were the user's."""
    with pytest.raises(CellExecutionError) as error:
        run_notebook(ROOT / "2.prepare_data.ipynb", tmp_path, "\n".join([
            "raw_dir = 'out/raw/embeded'", "make_embedded_if_missing = True", "pretrain, sft, dpo, tasks = [], [], [], []",
            "out_dir = 'out/data'", "val_frac = 0.05", "seed = 0", "near_dup_threshold = 0.85", "min_chars = 10"]))
    shown = str(error.value).split("------------------\n")[-1]  # what the cell shows, after its source
    assert shown.strip() == "DataError: out/raw/embeded: no such file or directory"
    assert not (tmp_path / "out").exists()


def test_ids_repeated_across_files_are_made_unique_for_stage_7(tmp_path):
    for name in ("alpaca_a.json", "alpaca_b.json"):  # each file numbers its records from 1
        records = [{"id": i, "instruction": f"{name}: question {i}?", "output": f"Answer {i}."} for i in range(1, 31)]
        (tmp_path / name).write_text(json.dumps(records))
    prepare({"sft": [tmp_path / "alpaca_a.json", tmp_path / "alpaca_b.json"]}, tmp_path / "data", val_frac=0.0,
            progress=False)
    written = read(tmp_path / "data/sft_train.jsonl")
    assert len(written) == 60 and len({r["id"] for r in written}) == 60
    assert [r["id"] for r in written[:2]] == ["1", "2"]  # a record's own id is kept while it is free
    assert len(sample_prompts(tmp_path / "data/sft_train.jsonl", 60, seed=0)) == 60  # stage 7's reader


def test_a_small_corpus_whose_split_held_out_nothing_still_has_a_validation_record(tmp_path):
    """A few dozen conversations often hash none into val at val_frac 0.05: the --data run then stopped after the
    training, at stage 7's validation prompts (and the evaluation at its empty tasks), with nothing held out."""
    conversations = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                                   {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(200)]
    text = "user: {}\nassistant: {}"  # what stage 2 hashes for an SFT record
    train_only = [c for c in conversations
                  if split_of(text.format(*(m["content"] for m in c["messages"])), 0.05) == "train"][:20]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in train_only))
    stats = prepare({"sft": [tmp_path / "sft.jsonl"]}, tmp_path / "data", progress=False)
    assert (stats["sft"]["train"], stats["sft"]["val"]) == (19, 1)
    written = read(tmp_path / "data/sft_train.jsonl") + read(tmp_path / "data/sft_val.jsonl")
    assert [r["messages"] for r in written] == [c["messages"] for c in train_only]  # none lost, none twice
    assert prepare({"sft": [tmp_path / "sft.jsonl"]}, tmp_path / "none", val_frac=0, progress=False)["sft"]["val"] == 0


def test_parallel_minhash_writes_what_one_process_writes(tmp_path):
    """The MinHash values of pretraining text were computed in the main process alone: 0.7 MB/s, about 40 minutes
    for MiniMind's 1.6 GB pretrain_hq.jsonl (BENCHMARKS.md, "Stage 2 preparation"). Worker processes compute them
    now, and the LSH index takes them in the input's order: the outputs are byte for byte those of one process, and
    of the code before (the digest below is what it wrote for this corpus)."""
    import hashlib

    docs = [prose(i, 70) for i in range(700)]
    docs += [docs[i].replace("river", "rivers", 1) + " coda" for i in range(0, 700, 7)]  # near duplicates
    docs += docs[:30] + ["too short"]
    random.Random(0).shuffle(docs)
    corpus = tmp_path / "pretrain.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    outputs = {}
    for workers in (1, 2):
        stats = prepare({"pretrain": [corpus]}, tmp_path / f"w{workers}", workers=workers, progress=False)
        assert stats["pretrain"]["removed"] == {"exact_dup": 30, "near_dup": 82, "too_short": 1}
        outputs[workers] = [(tmp_path / f"w{workers}" / name).read_bytes()
                            for name in ("pretrain_train.jsonl", "pretrain_val.jsonl", "stats.json")]
    assert outputs[1] == outputs[2]
    assert hashlib.sha256(b"".join(outputs[1][:2])).hexdigest() == "85a1e39e3d9a59efc23fbb634d8dafea10b8348a1f1481c0c4d7a82f9d374ba9"
    with pytest.raises(SystemExit, match="workers must be >= 0"):
        main(["--pretrain", str(corpus), "--out_dir", str(tmp_path / "o"), "--workers", "-1", "--no_progress"])


def test_progress_off_a_terminal_is_plain_lines_in_mb(tmp_path, monkeypatch, capsys):
    """Off a terminal (`run_pipeline.sh` into its log) stage 2 printed nothing until it ended: on MiniMind's 1.6 GB
    corpus, many minutes without a line. Now it prints MB read of the total, with rate and ETA."""
    from mateconv.data import prepare as prepare_module

    # a look at every record: the corpus takes a second (raising=False: the code before had no such setting)
    monkeypatch.setattr(prepare_module, "PROGRESS_EVERY", 0, raising=False)
    corpus = tmp_path / "pretrain.jsonl"
    corpus.write_text("".join(json.dumps({"text": prose(i, 40)}) + "\n" for i in range(3000)), encoding="utf-8")
    main(["--pretrain", str(corpus), "--out_dir", str(tmp_path / "o"), "--near_dup_threshold", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[prepare pretrain] ")]
    size = corpus.stat().st_size / 1e6
    assert len(lines) >= 5 and all(f"/{size:,.1f} MB (" in line and " eta " in line for line in lines), lines
    assert f"{size:,.1f}/{size:,.1f} MB (100%)" in lines[-1], lines


def test_a_minhash_worker_killed_is_one_line_and_leaves_no_output(tmp_path):
    """A worker killed (as the kernel's out-of-memory killer does) ends the run with one line, not a traceback or a
    wait for ever, and leaves no output directory behind."""
    corpus = tmp_path / "pretrain.jsonl"
    corpus.write_text("".join(json.dumps({"text": prose(i, 80)}) + "\n" for i in range(6000)), encoding="utf-8")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "mateconv.data.prepare", "--pretrain", str(corpus), "--out_dir",
                                str(out), "--workers", "2", "--no_progress"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while process.poll() is None and not psutil.Process(process.pid).children() and time.time() < deadline:
        time.sleep(0.05)
    workers = psutil.Process(process.pid).children() if process.poll() is None else []
    assert workers, process.communicate()[1][-2000:]
    workers[0].kill()
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run waited for the killed worker")
    assert process.returncode == 1 and stderr.strip() == ("error: a MinHash worker died (killed, perhaps for lack of "
                                                          "memory); fewer --workers use less memory"), stderr[-2000:]
    assert not out.exists()


def test_kill_2_stops_a_background_job_of_a_script_and_leaves_the_outputs_as_they_were(tmp_path):
    """Stage 2 started as `bash -c 'nohup ... &'` (SIGINT comes ignored there): `kill -2` did nothing, the run went on
    to the end and replaced the outputs. Now it stops with one line, its out_dir as it was (no .tmp file), and the
    same command then runs to the end."""
    corpus = tmp_path / "pretrain.jsonl"
    corpus.write_text("".join(json.dumps({"text": prose(i, 80)}) + "\n" for i in range(4000)), encoding="utf-8")
    out, log = tmp_path / "data", tmp_path / "prepare.log"
    out.mkdir()
    (out / "pretrain_train.jsonl").write_text("an earlier run's\n")
    command = f"{sys.executable} -m mateconv.data.prepare --pretrain {corpus} --out_dir {out} --workers 2 --no_progress"
    started = subprocess.run(["bash", "-c", f"nohup {command} > {log} 2>&1 & echo $!"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
    pid = int(started.stdout)
    deadline = time.time() + 60
    being_written = out / "pretrain_train.jsonl.tmp"
    while not (being_written.is_file() and being_written.stat().st_size) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(pid, signal.SIGINT)
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    assert log.read_text() == f"prepare: interrupted; {out} is as it was before this run\n"
    assert [path.name for path in out.iterdir()] == ["pretrain_train.jsonl"]
    assert (out / "pretrain_train.jsonl").read_text() == "an earlier run's\n"
    rerun = subprocess.run(command.split(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((out / "stats.json").read_text())["pretrain"]["read"] == 4000
