"""The embedded demo data: determinism, held-out task instances, every answer form checked right."""
from __future__ import annotations

import json

import pytest

from mateconv.data.embedded import KINDS, all_tasks, generate, main
from mateconv.tasks import ANSWER_FORM, check_answer, extract_answer

SMALL = dict(pretrain_chars=40_000, sft_conversations=300, dpo_pairs=100, train_tasks=50, val_tasks=50)


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate(tmp_path / "a", seed=5, **SMALL)
    generate(tmp_path / "b", seed=5, **SMALL)
    generate(tmp_path / "c", seed=6, **SMALL)
    names = ["pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "tasks.jsonl"]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    assert (tmp_path / "a/sft.jsonl").read_bytes() != (tmp_path / "c/sft.jsonl").read_bytes()


def test_contents_splits_and_held_out_instances(tmp_path):
    counts = generate(tmp_path, **SMALL)
    assert counts == {"pretrain": counts["pretrain"], "sft": 300, "dpo": 100, "tasks": 100}
    pretrain = " ".join(r["text"] for r in read(tmp_path / "pretrain.jsonl"))
    assert 40_000 <= len(pretrain) < 45_000
    assert any("\u4e00" <= ch <= "\u9fff" for ch in pretrain) and " equals " in pretrain
    tasks = read(tmp_path / "tasks.jsonl")
    assert {t["kind"] for t in tasks} == set(KINDS) and {t["lang"] for t in tasks} == {"en", "zh"}
    val_questions = {t["messages"][0]["content"] for t in tasks if t["split"] == "val"}
    assert len(val_questions) == 50
    sft = read(tmp_path / "sft.jsonl")
    train_user_turns = {m["content"] for r in sft if r["split"] == "train" for m in r["messages"] if m["role"] == "user"}
    assert not val_questions & train_user_turns  # held-out prompts never appear in SFT training data
    assert len({json.dumps(r["messages"]) for r in sft}) == len(sft)
    for pair in read(tmp_path / "dpo.jsonl"):
        assert pair["chosen"] != pair["rejected"]
        record = {"answer": extract_answer(pair["chosen"][0]["content"])}
        assert check_answer(record, pair["chosen"][0]["content"])
        assert not check_answer(record, pair["rejected"][0]["content"])


def test_every_task_answer_form_is_checked_right():
    tasks = all_tasks(seed=0)
    assert len({t.key for t in tasks}) > 1000
    for task in tasks:
        record = {"answer": task.answer, "kind": task.kind}
        assert check_answer(record, ANSWER_FORM[task.lang].format(task.answer)), task
        assert not check_answer(record, ANSWER_FORM[task.lang].format(task.wrong)), task
        assert task.answer in task.fact  # pretraining prose states the fact


def test_kinds_subset(tmp_path):
    generate(tmp_path, kinds=("compare", "repeat"), **SMALL)
    assert {t["kind"] for t in read(tmp_path / "tasks.jsonl")} == {"compare", "repeat"}
    with pytest.raises(ValueError, match="unknown task kinds"):
        generate(tmp_path, kinds=("nope",))


def test_cli(tmp_path, capsys):
    main(["--out_dir", str(tmp_path), "--pretrain_chars", "1000", "--sft_conversations", "10", "--dpo_pairs", "10",
          "--train_tasks", "5", "--val_tasks", "5"])
    assert "sft 10" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out_dir", str(tmp_path), "--val_percent", "0"])


def test_the_notebooks_demo_data_is_all_there_or_not_at_all(tmp_path, monkeypatch):
    """Notebook 1 interrupted while it wrote out/raw/embedded left the pretraining file alone there; the next run
    found the directory, kept it, and trained on it (notebook 2 then prepared no conversations)."""
    from mateconv.data import embedded

    monkeypatch.chdir(tmp_path)
    real = embedded.sft_conversation

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C (Jupyter's interrupt) after pretrain.jsonl is written

    monkeypatch.setattr(embedded, "sft_conversation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.make_if_missing([embedded.DEFAULT_DIR])
    assert not (tmp_path / "out/raw/embedded").exists()
    monkeypatch.setattr(embedded, "sft_conversation", real)
    embedded.make_if_missing([embedded.DEFAULT_DIR])
    assert sorted(p.name for p in (tmp_path / "out/raw/embedded").iterdir()) == [
        "dpo.jsonl", "pretrain.jsonl", "sft.jsonl", "tasks.jsonl"]
