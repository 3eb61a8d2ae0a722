"""The pipeline on the user's own files (`run_pipeline.sh --data DIR`, docs/own_data.md): the stage 7 / DPO decision
table, --tokenizer, one corpus per out/, and a MiniMind-format corpus from ../shared/data end to end at tiny size."""
from __future__ import annotations

import json
import math
import shlex
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from conftest import REPO, single_thread_env
from prefs_fake_server import FakeOpenAI, tasks
from transformers import AutoTokenizer

from mateconv.chat_format import CHAT_TEMPLATE
from mateconv.data.formats import split_hh
from mateconv.data.sources import readable_size
from mateconv.files import read_metrics
from mateconv.pipeline import (PipelineError, apply_sets, build_stages, check_source, judge_warning, load_preset,
                               same_normalization, set_judge_model, use_data)
from mateconv.pipeline import main as pipeline_main
from mateconv.tokenizer import adopt_tokenizer

ENDPOINT = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
STAGE7 = {"prefs", "prefs_val", "prefs_tokens", "prefs_val_tokens"}
TEXT = {"text": "A paragraph of pretraining text about rivers, stones and the morning light."}
SFT = {"conversations": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
PAIR = {"chosen": SFT["conversations"], "rejected": [SFT["conversations"][0], {"role": "assistant", "content": "Rome."}]}
TASK = {"id": "t1", "kind": "add", "messages": [{"role": "user", "content": "What is 2 plus 3?"}], "answer": "5"}


def corpus(root: Path, **files: dict) -> Path:
    root.mkdir()
    for name, record in files.items():
        (root / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
    return root


def plan(data: Path, env: dict, tokenizer: Path | None = None, judge_model: str | None = None) -> tuple[dict, str]:
    preset = load_preset("tiny")
    if judge_model:
        set_judge_model(preset, judge_model)
    report, _ = use_data(preset, data, tokenizer, env)
    return preset["stages"], "\n".join(report)


def test_a_model_judge_that_fails_its_health_check_is_warned_of_before_the_first_stage(tmp_path, monkeypatch):
    """The judge endpoint was first tried by stage 7, after pretraining and SFT: at seed size hours into the run."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)
    preset = load_preset("tiny")
    use_data(preset, data, None, ENDPOINT)
    warning = judge_warning(preset, ENDPOINT, timeout_s=5)
    assert warning.startswith("[pipeline] warning: judge endpoint http://127.0.0.1:9/v1 is unreachable: ")
    assert warning.endswith("Connection error (stage 7 needs the judge after SFT: have it up by then, or the run "
                            "stops there)")
    fake = FakeOpenAI()
    try:
        up = {"OPENAI_BASE_URL": fake.url}
        for judge_model, said in (("judge", None), ("gpt-4o-mini", "judge model 'gpt-4o-mini' is not served at")):
            preset = load_preset("tiny")
            set_judge_model(preset, judge_model)
            use_data(preset, data, None, up)
            warning = judge_warning(preset, up)
            assert warning is None if said is None else said in warning
    finally:
        fake.close()
    done = Path(preset["stages"]["prefs"]["done"])
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    assert judge_warning(preset, ENDPOINT) is None  # stage 7 is done: its judge is not needed


def test_decision_table_for_stage_7_and_dpo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # out/ of the plans
    full = corpus(tmp_path / "full", pretrain=TEXT, sft=SFT, dpo=PAIR, tasks=TASK)
    stages, report = plan(full, ENDPOINT)  # tasks present: the rule judge, even with an endpoint set
    assert "verifiable tasks" in report and "rule judge" in report and "data" not in stages
    assert stages["prefs"]["args"]["prompts_path"] == "out/data/tasks_train.jsonl"
    assert stages["prefs"]["args"]["judge"] == "rule" and stages["prefs"]["args"]["generator_base_url"] == "local"
    assert stages["prefs_tokens"]["args"]["input"] == ["out/prefs/dpo_pairs.jsonl", "out/data/dpo_train.jsonl"]
    assert stages["eval"]["args"]["tasks"] == "out/data/tasks_val.jsonl"

    pairs = corpus(tmp_path / "pairs", pretrain=TEXT, sft=SFT, dpo=PAIR)
    stages, report = plan(pairs, ENDPOINT)  # an endpoint: the model judge on held-out SFT prompts
    assert "judge endpoint is set (judge gpt-4o-mini at http://127.0.0.1:9/v1" in report
    assert stages["prefs"]["args"]["prompts_path"] == "out/data/sft_prompts.jsonl"
    assert stages["prefs_val"]["args"]["prompts_path"] == "out/data/sft_val.jsonl"
    assert stages["prefs"]["args"]["judge"] == stages["prefs_val"]["args"]["judge"] == "model"
    assert stages["prepare"]["args"]["max_prompts"] == stages["prefs"]["args"]["n_prompts"]
    assert stages["prepare"]["args"]["prompts_frac"] == 0.1
    assert stages["prefs_val_tokens"]["args"]["input"][1] == "out/data/dpo_val.jsonl"
    assert stages["eval"]["args"]["tasks"] == "none"
    command = {s.name: s.command for s in build_stages({"stages": stages}, Path("out").resolve())}["prefs"]
    assert command[command.index("--generator_base_url") + 1] == "local"

    stages, report = plan(pairs, ENDPOINT, judge_model="qwen-judge")  # --judge_model: one judge for all
    assert "judge endpoint is set (judge qwen-judge at http://127.0.0.1:9/v1" in report
    commands = {s.name: s.command for s in build_stages({"stages": stages}, Path("out").resolve())}
    for name in ("prefs", "prefs_val", "eval"):
        assert commands[name][commands[name].index("--judge_model") + 1] == "qwen-judge"

    stages, report = plan(pairs, {})  # the data's pairs and no endpoint: DPO on them, stage 7 skipped
    assert "DPO trains on the preference pairs from the data; stage 7 skipped" in report
    assert not STAGE7 & set(stages) and stages["dpo"]["args"]["data_path"] == "out/tokens/dpo/train"
    assert stages["dpo"]["args"]["val_data_path"] == "out/tokens/dpo/val"
    assert stages["tokens"]["done"] == "out/tokens/dpo/val/index.json"
    assert "prompts_frac" not in stages["prepare"]["args"]  # no stage 7: every SFT conversation trains

    plain = corpus(tmp_path / "plain", pretrain=TEXT, sft=SFT)
    stages, report = plan(plain, {})  # neither: no DPO, stop after SFT and evaluation
    assert "DPO skipped, the run stops after SFT and evaluation" in report
    assert list(stages) == ["tokenizer", "prepare", "tokens", "pretrain", "sft", "eval"]
    assert stages["eval"]["args"]["models"] == ["out/pretrain/final", "out/sft/final"]
    assert stages["tokens"]["done"] == "out/tokens/sft/val/index.json"

    assert "prompts_frac" not in stages["prepare"]["args"]

    (tmp_path / "out/data").mkdir(parents=True)  # prepared before a judge was set: no held-out prompts
    (tmp_path / "out/data/stats.json").write_text(json.dumps({"sft": {"kept": 5, "train": 4, "val": 1}}))
    stages, report = plan(pairs, ENDPOINT)
    assert stages["prefs"]["args"]["prompts_path"] == "out/data/sft_train.jsonl"
    assert "on the SFT training prompts (out/data was prepared without held-out prompts" in report
    assert "prompts_frac" not in stages["prepare"]["args"]

    stages, report = plan(corpus(tmp_path / "text", pretrain=TEXT), ENDPOINT)
    assert "no SFT conversations" in report and list(stages) == ["tokenizer", "prepare", "tokens", "pretrain", "eval"]
    assert "preference pairs" not in report
    stages, report = plan(corpus(tmp_path / "text_pairs", pretrain=TEXT, dpo=PAIR), {})  # tinyshakespeare + hh-rlhf
    assert "dpo" not in stages and ("no SFT conversations in the data: pretraining only, then evaluation; the "
                                    "preference pairs are not used (DPO starts from the SFT model)") in report

    with pytest.raises(PipelineError, match="no pretraining text"):
        plan(corpus(tmp_path / "chat", sft=SFT), {})


@pytest.mark.parametrize("name", ["mateconv-0.02b", "mateconv-moe", "2gpu"])
def test_seed_presets_take_the_data(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT, dpo=PAIR)
    preset = load_preset(name)
    use_data(preset, data, None, ENDPOINT)
    assert preset["stages"]["prepare"]["args"]["max_prompts"] == 3000  # the preset's n_prompts
    preset = load_preset(name)
    use_data(preset, data, None, {})
    commands = {stage.name: stage.command for stage in build_stages(preset, Path("out").resolve())}
    assert list(commands) == ["tokenizer", "prepare", "tokens", "pretrain", "sft", "dpo", "eval"]
    assert commands["tokenizer"][commands["tokenizer"].index("--vocab_size") + 1] == "6400"
    assert str(tmp_path / "data/sft.jsonl") in commands["prepare"] and "--raw_dir" not in commands["prepare"]


def test_minimind_tokenizer_is_adopted_not_trained(tmp_path, shared_data):
    minimind = shared_data("jingyaogong__minimind/model")
    stages, report = plan(corpus(tmp_path / "data", pretrain=TEXT, sft=SFT), {}, minimind)
    assert stages["tokenizer"]["args"] == {"from_pretrained": str(minimind), "out_dir": "out/tokenizer"}
    assert stages["pretrain"]["args"]["vocab_size"] == 6400 and "(6400 tokens), not trained" in report

    ours = AutoTokenizer.from_pretrained(adopt_tokenizer(minimind, tmp_path / "tok"))
    theirs = AutoTokenizer.from_pretrained(minimind)
    text = "MiniMind 的分词器，on English too."
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.chat_template == CHAT_TEMPLATE and (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (0, 1, 2)


def test_one_corpus_per_out_directory(tmp_path):
    out = tmp_path / "out"
    first = {"data": "/corpus/a", "tokenizer": None, "files": {}}
    check_source(out, first)
    check_source(out, first)  # the same data again: resumes
    with pytest.raises(PipelineError, match="was made with --data /corpus/a"):
        check_source(out, {"data": "/corpus/b", "tokenizer": None, "files": {}})
    with pytest.raises(PipelineError, match="was made with --data /corpus/a"):
        check_source(out, None)
    (tmp_path / "demo/out/data").mkdir(parents=True)
    (tmp_path / "demo/out/data/stats.json").write_text("{}")
    with pytest.raises(PipelineError, match="holds a run on the embedded demo data"):
        check_source(tmp_path / "demo/out", first)


def data_source(data: Path) -> dict:
    """What the pipeline records of a --data run on `data` (check_source), its files as they are now."""
    return {"data": str(data), "tokenizer": None, "files": use_data(load_preset("tiny"), data, None, {})[1]}


def test_a_changed_data_directory_stops_the_run_with_what_changed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)
    out = tmp_path / "out"

    source = partial(data_source, data)

    check_source(out, source())
    (data / "sft.jsonl").write_text(json.dumps(SFT) + "\n" + json.dumps(SFT) + "\n")
    check_source(out, source())  # a change before stage 2 has read the files: taken
    (out / "data").mkdir()
    (out / "data/stats.json").write_text("{}")  # stage 2 has read them
    check_source(out, source())  # unchanged: resumes
    (data / "dpo.jsonl").write_text(json.dumps(PAIR) + "\n")
    (data / "notes.md").write_text("not data: no change")
    with open(data / "sft.jsonl", "a") as f:
        f.write(json.dumps(SFT) + "\n")
    with pytest.raises(PipelineError, match=rf"^{data} changed since {out}/data was prepared from it \(added: "
                       rf"{data}/dpo.jsonl; changed: {data}/sft.jsonl\): .* remove {out} to start over, or "
                       rf"{out}/data, {out}/tokens and the outputs of the later stages to redo"):
        check_source(out, source())
    shutil.rmtree(out / "data")
    check_source(out, source())  # to be prepared again: the files as they are now are recorded
    (out / "data").mkdir()
    (out / "data/stats.json").write_text("{}")
    check_source(out, source())


def test_files_changed_after_the_tokenizer_trained_on_them_are_said_and_named_in_the_redo(tmp_path, monkeypatch,
                                                                                           capsys):
    """The tokenizer trains on the --data files before stage 2 reads them: files changed after it (or after removing
    out/data and out/tokens as the error says) went on with a tokenizer of the earlier files, and nothing said so."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)
    out = tmp_path / "out"

    source = partial(data_source, data)

    check_source(out, source())
    (out / "tokenizer").mkdir()
    (out / "tokenizer/tokenizer.json").write_text("{}")
    (data / "dpo.jsonl").write_text(json.dumps(PAIR) + "\n")
    check_source(out, source())  # kept: the run goes on
    assert (f"[pipeline] note: {data} changed since {out}/tokenizer was trained on it (added: {data}/dpo.jsonl): "
            f"the run goes on with that tokenizer; remove {out}/tokenizer to train it") in capsys.readouterr().out
    (out / "data").mkdir()
    (out / "data/stats.json").write_text("{}")
    (data / "dpo.jsonl").unlink()
    with pytest.raises(PipelineError, match=rf"the outputs of the later stages to redo \(the run says which are older "
                       rf"than their inputs; {out}/tokenizer too, to train the tokenizer on them\)$"):
        check_source(out, source())
    check_source(out, {**source(), "files": json.loads((out / "data_source.json").read_text())["files"]})
    assert "note" not in capsys.readouterr().out  # unchanged: nothing to say


def test_an_edited_dataset_info_json_stops_the_run_as_a_changed_file_does(tmp_path, monkeypatch):
    """LLaMA-Factory's dataset_info.json says how its files are read: editing it after stage 2 changes the data, but
    the run went on with the data prepared before."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)
    info = data / "dataset_info.json"
    info.write_text(json.dumps({"chat": {"file_name": "sft.jsonl", "formatting": "sharegpt"}}))
    out = tmp_path / "out"

    source = partial(data_source, data)

    check_source(out, source())
    (out / "data").mkdir()
    (out / "data/stats.json").write_text("{}")
    info.write_text(json.dumps({"chat": {"file_name": "sft.jsonl", "formatting": "sharegpt", "columns": {}}}))
    with pytest.raises(PipelineError, match=rf"^{data} changed since {out}/data was prepared from it \(changed: "
                       rf"{info}\)"):
        check_source(out, source())


def test_the_printed_stage_commands_can_be_pasted_with_spaces_in_the_paths(tmp_path, monkeypatch, capsys):
    """`--data "my data"`: the run printed `--pretrain /.../my data/pretrain.jsonl`, which pasted into a shell to rerun
    the stage names two files that do not exist."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "my data", pretrain=TEXT, sft=SFT)
    assert pipeline_main(["run", "--data", str(data), "--only", "prepare"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if "mateconv.data.prepare" in line]
    assert str(data / "pretrain.jsonl") in shlex.split(line.removeprefix("[pipeline] prepare: "))


def test_only_naming_a_stage_the_data_leaves_out_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "JUDGE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)  # no pairs, no judge: no stage 7, no DPO
    assert pipeline_main(["run", "--data", str(data), "--only", "prefs,dpo"]) == 2
    assert capsys.readouterr().err == (f"error: --only names stages that this run on {data} leaves out: dpo, prefs "
                                       "(the lines above say why)\n")
    assert pipeline_main(["run", "--data", str(data), "--only", "dop"]) == 2
    assert capsys.readouterr().err == "error: --only names unknown stages: dop\n"
    assert not (tmp_path / "out").exists()


def test_stage_2_holds_out_as_many_prompts_as_a_set_n_prompts_asks(tmp_path, monkeypatch):
    """On the judge path `--set prefs.n_prompts=2` still held the preset's 400 out of SFT (10% of them): stage 7 used 2,
    and the rest trained nothing. `--set prepare.max_prompts` still decides where given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", ENDPOINT["OPENAI_BASE_URL"])
    data = tmp_path / "data"
    data.mkdir()
    (data / "pretrain.jsonl").write_text(json.dumps(TEXT) + "\n")
    (data / "sft.jsonl").write_text("".join(json.dumps({"conversations": [
        {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
        for i in range(100)))
    assert pipeline_main(["run", "--data", str(data), "--only", "prepare", "--set", "prefs.n_prompts=2"]) == 0
    assert len((tmp_path / "out/data/sft_prompts.jsonl").read_text().splitlines()) == 2
    shutil.rmtree(tmp_path / "out")
    assert pipeline_main(["run", "--data", str(data), "--only", "prepare", "--set", "prefs.n_prompts=2",
                          "prepare.max_prompts=3"]) == 0
    assert len((tmp_path / "out/data/sft_prompts.jsonl").read_text().splitlines()) == 3


def test_set_for_a_stage_the_data_leaves_out_is_ignored_with_a_note(tmp_path, monkeypatch, capsys):
    """The same `--set sft.max_steps=... --set dpo.max_steps=...` lines on a pretraining-only corpus stopped the run
    with `--set names unknown stage 'sft'`, a stage every run knows."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT)
    assert pipeline_main(["run", "--data", str(data), "--only", "prepare", "--set", "sft.max_steps=3"]) == 0
    assert ("[pipeline] --set sft.max_steps=3 changes nothing: this run on the data leaves stage sft out (the lines "
            "above say why)") in capsys.readouterr().out
    assert pipeline_main(["run", "--data", str(data), "--only", "prepare", "--set", "stf.max_steps=3"]) == 2
    assert "unknown stage 'stf'" in capsys.readouterr().err
    # a misspelt key for a left-out stage is still a typo, said as for a stage that runs (it said "changes nothing")
    assert pipeline_main(["run", "--data", str(data), "--only", "prepare", "--set", "dpo.max_stpes=3"]) == 2
    said = capsys.readouterr().err
    assert "dpo: unknown config key 'max_stpes'; did you mean 'max_steps'? (nothing was run)" in said


def test_data_without_pretraining_text_still_says_what_each_file_is(tmp_path, monkeypatch, capsys):
    """hh-rlhf alone (or a text file skipped for its encoding) stopped with 'no pretraining text' and no line on what
    the files had been taken for or why one was skipped."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", dpo=PAIR)
    (data / "notes.csv").write_text("text\nA paragraph.\n")
    (data / "poems.txt").write_bytes("床前明月光\n疑是地上霜\n".encode("gbk"))
    assert pipeline_main(["run", "--data", str(data)]) == 2
    said = capsys.readouterr()
    assert f"[pipeline] data: {data / 'dpo.jsonl'} → dpo, MiniMind/TRL chosen/rejected messages" in said.out
    assert f"[pipeline] data: {data / 'notes.csv'} → skipped: not a " in said.out
    skipped = next(line for line in said.out.splitlines() if line.startswith(f"[pipeline] data: {data / 'poems.txt'}"))
    assert "→ skipped: " in skipped and "not UTF-8 text" in skipped
    assert said.err.startswith(f"error: {data}: no pretraining text") and said.err.count("\n") == 1


def test_a_typo_in_a_prepare_flag_stops_the_run_before_the_tokenizer_trains(tmp_path, monkeypatch, capsys):
    """`--set prepare.val_frac=abc` failed only once the tokenizer had trained on the whole corpus (minutes to hours
    on a real one), while the other stages' flags are checked before anything runs. Nothing is written either: the
    refused run left out/data_source.json, and the next run, on another --data, was refused for it."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)
    assert pipeline_main(["run", "--data", str(data), "--set", "prepare.val_frac=abc"]) == 2
    assert capsys.readouterr().err == ("error: prepare: argument --val_frac: invalid float value: 'abc' (nothing was "
                                       "run)\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_tokenizer_training_flags_with_tokenizer_stop_the_run_before_anything_runs(tmp_path, monkeypatch, capsys,
                                                                                   tiny_tokenizer):
    """`--tokenizer PATH --set tokenizer.vocab_size=8000` failed only when the tokenizer stage ran ('tokenizer failed
    with exit code 2', the reason in its log), while the other stages' flag errors are found before anything runs.
    The line names the flags typed (it named the tokenizer stage's --corpus and --from_pretrained)."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT)
    assert pipeline_main(["run", "--data", str(data), "--tokenizer", str(tiny_tokenizer),
                          "--set", "tokenizer.vocab_size=8000"]) == 2
    assert capsys.readouterr().err == (f"error: --set tokenizer.vocab_size=8000: --tokenizer {tiny_tokenizer} is used "
                                       "as it is, not trained (leave out --tokenizer to train one on --data with "
                                       "these settings)\n")
    assert not (tmp_path / "out" / "tokenizer").exists() and not (tmp_path / "logs").exists()


def test_a_tokenizer_path_that_is_not_there_is_named_once(tmp_path, monkeypatch, capsys):
    """`--tokenizer ../shared/data/jingyaogong__minimind/model` from a directory where it is not: the path was said
    twice, then a Rust error ('... not a readable tokenizer.json: No such file or directory (os error 2)')."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain=TEXT)
    assert pipeline_main(["run", "--data", str(data), "--tokenizer", "minimind/model"]) == 2
    assert capsys.readouterr().err == f"error: --tokenizer {tmp_path / 'minimind/model'}: no such file or directory\n"


def test_data_can_be_one_file(tmp_path, monkeypatch, capsys):
    """`--data pretrain_hq.jsonl`, as a MiniMind user names their one file, was refused ('not a directory'): it is read
    as a directory holding only that file (the files beside it are not used); a path that is not there is one line."""
    monkeypatch.chdir(tmp_path)
    data = corpus(tmp_path / "data", pretrain_hq=TEXT, sft=SFT)
    assert pipeline_main(["run", "--data", str(data / "pretrain_hq.jsonl"), "--only", "prepare"]) == 0
    said = capsys.readouterr().out
    assert f"[pipeline] data: {data / 'pretrain_hq.jsonl'} → pretrain, jsonl 'text' field" in said
    assert "sft.jsonl" not in said and "no SFT conversations in the data" in said
    used = json.loads((tmp_path / "out/data_source.json").read_text())["files"]
    assert list(used) == [str(data / "pretrain_hq.jsonl")]
    assert pipeline_main(["run", "--data", str(data / "pretrain.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {data / 'pretrain.jsonl'}: no such file or directory\n"


def test_a_run_inside_its_data_directory_leaves_its_own_outputs_out(tmp_path, monkeypatch, capsys):
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)
    monkeypatch.chdir(data)  # `--data .`: out/ and logs/ are made inside the data directory
    for _ in range(2):  # the second run sees out/data/*.jsonl, which are not the user's data
        assert pipeline_main(["run", "--data", ".", "--only", "prepare"]) == 0
    said = capsys.readouterr().out
    assert f"[pipeline] data: {data / 'out'} → skipped: this run's own outputs" in said
    assert f"{data / 'out'}/data/" not in said and "prepare: done" in said
    assert set(json.loads((data / "out/data_source.json").read_text())["files"]) == {
        str(data / "pretrain.jsonl"), str(data / "sft.jsonl")}


def minimind_corpus(root: Path, shared_data) -> Path:
    """MiniMind's three files, built from the shared data: pretrain_hq.jsonl ({"text"}, one line cut off),
    sft_mini_512.jsonl ({"conversations": [{role, content}]}) and dpo.jsonl ({"chosen": [...], "rejected": [...]})."""
    root.mkdir()
    docs = [json.loads(line) for line in shared_data("hiyouga__LLaMA-Factory/data/c4_demo.jsonl").open()][:240]
    lines = [json.dumps({"text": doc["text"]}) for doc in docs]
    lines.insert(99, '{"text": "a line cut off in the mid')
    (root / "pretrain_hq.jsonl").write_text("\n".join(lines) + "\n")
    alpaca = json.loads(shared_data("hiyouga__LLaMA-Factory/data/alpaca_en_demo.json").read_text())[:300]
    with open(root / "sft_mini_512.jsonl", "w") as sft:
        for record in alpaca:
            question = "\n\n".join(part for part in (record["instruction"], record["input"]) if part)
            sft.write(json.dumps({"conversations": [{"role": "user", "content": question},
                                                    {"role": "assistant", "content": record["output"]}]}) + "\n")
    with open(root / "dpo.jsonl", "w") as dpo:
        for line in list(shared_data("anthropics__hh-rlhf/harmless-base/test.first200.jsonl").open())[:100]:
            record = json.loads(line)
            (prompt, chosen), (_, rejected) = split_hh(record["chosen"]), split_hh(record["rejected"])
            dpo.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": chosen}],
                                  "rejected": prompt + [{"role": "assistant", "content": rejected}]}) + "\n")
    return root


@pytest.mark.slow
def test_minimind_corpus_end_to_end(tmp_path, shared_data):
    data = minimind_corpus(tmp_path / "minimind", shared_data)
    env = {k: v for k, v in single_thread_env().items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "JUDGE_API_KEY")}
    sets = ["pretrain.max_steps=40", "pretrain.eval_interval=20", "sft.max_steps=20", "sft.eval_interval=20",
            "dpo.max_steps=10", "dpo.eval_interval=10", "dpo.batch_size=8", "eval.max_batches=4",
            "eval.max_new_tokens=16", "eval.max_bpb_docs=10"]
    result = subprocess.run(["bash", str(REPO / "scripts/run_pipeline.sh"), "--data", str(data),
                             *[arg for item in sets for arg in ("--set", item)]],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    stdout = result.stdout
    assert "\r" not in stdout + result.stderr  # output not a terminal: plain lines, no progress bars (issue 13 item 7)
    for name, kind in (("pretrain_hq.jsonl", "pretrain, jsonl 'text' field"),
                       ("sft_mini_512.jsonl", "sft, MiniMind conversations"),
                       ("dpo.jsonl", "dpo, MiniMind/TRL chosen/rejected messages")):
        assert f"{data / name} → {kind}, {readable_size((data / name).stat().st_size)}" in stdout
    assert "DPO trains on the preference pairs from the data; stage 7 skipped" in stdout
    assert f"{data / 'pretrain_hq.jsonl'}:100: malformed JSON" in stdout  # skipped, reported, the rest trained on
    out = tmp_path / "out"
    assert json.loads((out / "data/stats.json").read_text())["pretrain"]["kept"] >= 230

    losses = [row["loss"] for row in read_metrics(out / "pretrain/metrics.jsonl") if "loss" in row]
    assert losses[-1] < losses[0] - 0.3, losses
    dpo = [row for row in read_metrics(out / "dpo/metrics.jsonl") if "loss" in row]
    assert dpo and dpo[-1]["step"] == 10 and (out / "dpo/final/model.safetensors").exists()
    models = {Path(m["path"]).parent.name: m for m in json.loads((out / "eval/summary.json").read_text())["models"]}
    assert set(models) == {"pretrain", "sft", "dpo"}
    for name, model in models.items():
        assert math.isfinite(model["val_ppl"]) and model["val_ppl"] < 2048, (name, model["val_ppl"])  # < uniform
        assert 0 < model["val_bpb"] < 16, (name, model["val_bpb"])


@pytest.mark.slow
def test_stage_7_on_held_out_sft_prompts_with_the_model_judge(tmp_path, tiny_sft_model):
    """No tasks and no pairs in the data, a judge endpoint set: stage 7 runs on SFT prompts held out of SFT (today's
    "prompts file out/data/tasks_train.jsonl not found" is gone), the SFT model generating, the endpoint judging."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text("A paragraph of pretraining text about rivers and stones.\n")
    with open(data / "chat.jsonl", "w") as chat:
        for task in tasks(80):
            chat.write(json.dumps({"messages": task["messages"] + [
                {"role": "assistant", "content": f"The answer is {task['answer']}."}]}) + "\n")
    shutil.copytree(tiny_sft_model, tmp_path / "out/sft/final")  # stage 5's artifact: SFT is done
    fake = FakeOpenAI()
    try:
        env = {**single_thread_env(), "OPENAI_BASE_URL": fake.url}
        sets = ["prefs.judge_model=judge", "prefs.k_samples=3", "prefs.max_tokens=8", "prefs.max_concurrency=2"]
        result = subprocess.run([sys.executable, "-m", "mateconv.pipeline", "run", "--data", str(data), "--only",
                                 "prepare,prefs", *[arg for item in sets for arg in ("--set", item)]],
                                cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    finally:
        fake.close()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert f"judge endpoint is set (judge gpt-4o-mini at {fake.url}" in result.stdout
    out = tmp_path / "out"
    held = [json.loads(line) for line in (out / "data/sft_prompts.jsonl").read_text().splitlines()]
    trained = [json.loads(line) for line in (out / "data/sft_train.jsonl").read_text().splitlines()]
    held_prompts = {r["messages"][0]["content"] for r in held}
    assert held and not held_prompts & {r["messages"][0]["content"] for r in trained}
    summary = json.loads((out / "prefs/summary.json").read_text())
    assert summary["prompts_path"] == "out/data/sft_prompts.jsonl" and summary["judge_mode"] == "model"
    assert summary["models"] == {"generator": "mateconv", "judge": "judge", "generator_base_url": "local",
                                 "judge_base_url": fake.url}
    assert summary["this_run"]["prompts"] == len(held) and summary["this_run"]["failures"] == 0
    assert summary["this_run"]["pairs"] >= 1  # the judge's scores told some replies apart
    judged = {entry["pid"] for entry in fake.log if entry["model"] == "judge"}
    assert judged == {content.split("]")[0][1:] for content in held_prompts}  # every held-out prompt, nothing else
    assert not any(entry["model"] != "judge" for entry in fake.log)  # the SFT model generated, locally


def test_a_corpus_split_with_no_held_out_document_is_evaluated_without_perplexity(tmp_path, tiny_sft_model,
                                                                                    tiny_tokenizer):
    """A small corpus whose hash split put no document in pretrain_val.jsonl: the evaluation, after all the
    training, failed every model on the empty validation shards the preset named; it now skips perplexity as it
    skips the empty held-out texts."""
    from mateconv.data.tokenizing import build_shards

    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)
    for stage in ("pretrain", "sft"):
        shutil.copytree(tiny_sft_model, tmp_path / f"out/{stage}/final")
    (tmp_path / "empty.jsonl").write_text("")
    build_shards("pretrain", [tmp_path / "empty.jsonl"], tiny_tokenizer, tmp_path / "out/tokens/pretrain/val",
                 workers=1, progress=False)
    result = subprocess.run([sys.executable, "-m", "mateconv.pipeline", "run", "--data", str(data), "--only", "eval",
                             "--set", "eval.max_new_tokens=2"],
                            cwd=tmp_path, env=single_thread_env(), text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "out/tokens/pretrain/val not found or empty; skipping it" in result.stdout
    models = json.loads((tmp_path / "out/eval/summary.json").read_text())["models"]
    assert [m["val_ppl"] for m in models] == [None, None] and all(m["samples"] for m in models)


def test_a_run_without_sft_data_is_evaluated_without_a_note_on_sft_val(tmp_path, tiny_sft_model):
    """`--data` with pretraining text only: the evaluation said `out/data/sft_val.jsonl not found or empty; skipping
    it`, a file such a run never makes; its samples answer the built-in prompts."""
    data = corpus(tmp_path / "data", pretrain=TEXT)
    shutil.copytree(tiny_sft_model, tmp_path / "out/pretrain/final")
    result = subprocess.run([sys.executable, "-m", "mateconv.pipeline", "run", "--data", str(data), "--only", "eval",
                             "--set", "eval.max_new_tokens=2"],
                            cwd=tmp_path, env=single_thread_env(), text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sft_val.jsonl" not in result.stdout and "--heldout none" in result.stdout
    [model] = json.loads((tmp_path / "out/eval/summary.json").read_text())["models"]
    assert model["samples"]


def test_tokenizer_normalises_as_stage_2(tmp_path, monkeypatch):
    """`--set prepare.normalization=NFKC` reaches the tokenizer too: it trains on the text stage 2 writes."""
    monkeypatch.chdir(tmp_path)
    preset = load_preset("tiny")
    use_data(preset, corpus(tmp_path / "data", pretrain=TEXT), None, {})
    apply_sets(preset, ["prepare.normalization=NFKC"])
    same_normalization(preset)
    command = {s.name: s.command for s in build_stages(preset, Path("out").resolve())}["tokenizer"]
    assert command[command.index("--normalization") + 1] == "NFKC"


def test_an_error_after_output_into_a_closed_pipe_keeps_its_line():
    """A stage that printed a line (still in stdout's buffer, as off a terminal) and then fails, its output piped into a
    reader that is gone: its one-line error still reaches stderr. Before, a BrokenPipeError followed it."""
    program = ("import sys\nfrom mateconv.terminal import run_main\n"
               "def main():\n    print('a result line')\n    sys.exit('error: the input is bad')\nrun_main(main)\n")
    env = {key: value for key, value in single_thread_env().items() if key != "PYTHONUNBUFFERED"}
    child = subprocess.Popen([sys.executable, "-c", program], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    child.stdout.close()
    assert (child.wait(timeout=60), child.stderr.read()) == (1, "error: the input is bad\n")


def test_ctrl_c_a_program_does_not_handle_is_one_line(tmp_path):
    """Ctrl-C in a program with nothing of its own to keep (`pipeline stop`, the export, a chat script) ended with a
    KeyboardInterrupt traceback; it is one line and exit status 130, as a shell reports SIGINT."""
    program = tmp_path / "export.py"
    program.write_text("import time\nfrom mateconv.terminal import run_main\n"
                       "def main():\n    print('ready', flush=True)\n    time.sleep(60)\nrun_main(main)\n")
    child = subprocess.Popen([sys.executable, str(program)], env=single_thread_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGINT)
    assert (child.wait(timeout=60), child.stderr.read()) == (130, "export.py: interrupted\n")


@pytest.mark.parametrize("program, lines_read, made", [
    ("mateconv.pipeline", "[pipeline] prepare: ", "out/data/stats.json"),
    ("mateconv.data.prepare", "", "out/data/stats.json"),
    ("mateconv.tokenizer", "", "out/tokenizer/tokenizer.json"),
    ("3.dataset.py", "", "out/tokens/pretrain/index.json")], ids=["pipeline", "stage-2", "stage-1", "stage-3"])
def test_output_piped_into_head_ends_quietly(tmp_path, program, lines_read, made, tiny_tokenizer):
    """`... | head`: the reader goes away; the program stops as Unix tools do (141, as for SIGPIPE), with no traceback,
    and the pipeline's stage that was writing still finishes its work. Every stage program ends so (before, stages
    1 and 3 ended with a BrokenPipeError traceback)."""
    data = corpus(tmp_path / "data", pretrain=TEXT, sft=SFT)
    # the stage prints nothing before its outputs are written (no progress lines, which would break the pipe early
    # and stop it as Ctrl-C does, a race the test would lose under load)
    args = {"mateconv.pipeline": ["run", "--data", str(data), "--only", "prepare", "--set", "prepare.no_progress=true"],
            "mateconv.data.prepare": ["--pretrain", str(data / "pretrain.jsonl"), "--out_dir", "out/data",
                                      "--no_progress"],
            "mateconv.tokenizer": ["--corpus", str(data), "--vocab_size", "300", "--out_dir", "out/tokenizer",
                                   "--no_progress"],
            "3.dataset.py": ["--kind", "pretrain", "--input", str(data / "pretrain.jsonl"), "--tokenizer",
                             str(tiny_tokenizer), "--out_dir", "out/tokens/pretrain", "--workers", "1"]}[program]
    command = [str(REPO / program)] if program.endswith(".py") else ["-m", program]
    child = subprocess.Popen([sys.executable, *command, *args], cwd=tmp_path, env=single_thread_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while lines_read and not child.stdout.readline().startswith(lines_read):
        pass
    child.stdout.close()
    stderr = child.stderr.read()
    assert (child.wait(timeout=120), stderr) == (141, "")
    assert (tmp_path / made).exists()
