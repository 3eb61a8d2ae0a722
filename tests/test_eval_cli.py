"""Stage 6 end to end: `python -m mateconv.evaluate` and the 6.inference_evaluate.ipynb notebook (run for real with
nbclient) on the test world's SFT checkpoints (dense and MoE), its SFT validation shards and held-out tasks."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from mateconv.evaluate.cli import main
from mateconv.data.readers import path_list
from mateconv.evaluate.data import EvalError
from mateconv.evaluate.run import evaluate, is_model
from mateconv.tasks import check_answer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUESTION = "What is 3 plus 4?"
LABELS = ["sft/final", "sft_moe/final"]  # <stage>/<checkpoint> of tiny_sft_model and tiny_moe_sft_model


@pytest.fixture(scope="module")
def inputs(tiny_sft_model, tiny_moe_sft_model, tiny_tokens, tiny_embedded_data, greedy_reply) -> dict:
    """The models, validation shards and tasks evaluated, and the dense model's greedy reply to QUESTION."""
    return {"models": [str(tiny_sft_model), str(tiny_moe_sft_model)], "val": str(tiny_tokens / "sft" / "val"),
            "tasks": str(tiny_embedded_data / "tasks_val.jsonl"), "reply": greedy_reply(tiny_sft_model, QUESTION, 8)[0]}


def check_outputs(out: Path, inputs: dict) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == LABELS
    dense, moe = summary["models"]
    assert dense["kind"] == "dense" and moe["kind"] == "moe"
    assert dense["val_ppl"] < 3.0 and moe["val_ppl"] < 3.0  # SFT models on held-out replies (measured 2.2)
    assert dense["expert_load"] is None and dense["balance"] is None
    assert len(moe["expert_load"]) == 2 and len(moe["expert_load"][0]) == 4
    assert moe["load_cv_mean"] == pytest.approx(sum(moe["balance"]["cv"]) / 2, abs=1e-4)
    assert dense["samples"][QUESTION] == inputs["reply"]
    tasks = [json.loads(line) for line in Path(inputs["tasks"]).read_text().splitlines()]
    for report in (dense, moe):
        rows = [json.loads(line) for line in (out / f"tasks_{report['model'].replace('/', '_')}.jsonl").open()]
        verdicts = [check_answer(task, row["response"]) for task, row in zip(tasks, rows)]
        assert [row["correct"] for row in rows] == verdicts and report["tasks_n"] == len(tasks) == 60
        assert report["task_accuracy"] == pytest.approx(sum(verdicts) / len(tasks), abs=1e-4)
        for kind, accuracy in report["accuracy_by_kind"].items():
            hits = [v for task, v in zip(tasks, verdicts) if task["kind"] == kind]
            assert accuracy == pytest.approx(sum(hits) / len(hits), abs=1e-4)
    assert dense["task_accuracy"] >= 0.1  # measured 15 of 60 held-out tasks
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["model"] for r in rows] == LABELS and float(rows[0]["val_ppl"]) == dense["val_ppl"]
    markdown = (out / "summary.md").read_text()
    assert "| model | kind |" in markdown and "expert_load_" in markdown and QUESTION in markdown
    assert "## Task accuracy by kind" in markdown
    for png in ["metrics.png", f"expert_load_{LABELS[1].replace('/', '_')}.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return summary


def test_cli_writes_summaries_and_plots(inputs, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "mateconv.evaluate", "--models", *inputs["models"], "--val", inputs["val"],
               "--tasks", inputs["tasks"], "--prompts", QUESTION, "Who are you?", "--max_new_tokens", "8",
               "--out_dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    check_outputs(out, inputs)


def test_a_training_checkpoint_is_evaluated_as_its_model(tiny_sft_model, tmp_path, capsys):
    """A run stopped before final/ has checkpoints: the evaluation takes one (consolidated, as chat and export do)
    and its greedy reply is the final model's (the last checkpoint holds the final weights)."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000300"
    shutil.copytree(tiny_sft_model.parent / "checkpoints" / checkpoint.name, checkpoint)
    replies = {}
    for name, model in (("final", tiny_sft_model), ("checkpoint", checkpoint)):
        main(["--models", str(model), "--val", "none", "--tasks", "none", "--bpb_texts", "none", "--heldout", "none",
              "--prompts", QUESTION, "--max_new_tokens", "8", "--out_dir", str(tmp_path / name)])
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        replies[name] = summary["models"][0]["samples"]
    assert replies["checkpoint"] == replies["final"] and (checkpoint / "model" / "config.json").is_file()
    # the consolidated model written inside the checkpoint is no change to it: a rerun reuses its results
    capsys.readouterr()
    main(["--models", str(checkpoint), "--val", "none", "--tasks", "none", "--bpb_texts", "none", "--heldout", "none",
          "--prompts", QUESTION, "--max_new_tokens", "8", "--out_dir", str(tmp_path / "checkpoint")])
    assert "reused the results an earlier run kept" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tiny_sft_model, tmp_path):
    with pytest.raises(SystemExit) as error:
        main(["--models", str(tmp_path / "missing"), "--out_dir", str(tmp_path)])
    assert str(error.value) == (f"evaluate: no model at {tmp_path / 'missing'} (expected a save_pretrained directory "
                                "or a training checkpoint)")
    with pytest.raises(SystemExit) as error:
        main(["--models", str(tiny_sft_model), "--val", str(tmp_path / "nope.jsonl"), "--out_dir", str(tmp_path)])
    assert str(error.value) == f"evaluate: validation data not found: {tmp_path / 'nope.jsonl'}"
    with pytest.raises(SystemExit) as error:  # seed 000's `--mode test --device cuda:0` without that GPU: said once
        main(["--models", str(tiny_sft_model), str(tiny_sft_model), "--device", "cuda:99", "--out_dir", str(tmp_path)])
    assert str(error.value) == (f"evaluate: device cuda:99 is not there: {torch.cuda.device_count()} CUDA GPU(s) "
                                "visible; --device auto takes what there is")
    (tmp_path / "a_file").write_text("")  # an --out_dir that is a file, or unwritable: before any model is evaluated
    for out_dir, why in ((tmp_path / "a_file", "create the directory"), (Path("/proc"), "write in the directory")):
        with pytest.raises(SystemExit, match=f"^evaluate: --out_dir: cannot {why} {out_dir} \\("):
            main(["--models", str(tiny_sft_model), "--out_dir", str(out_dir), "--max_tasks", "0"])


def test_shards_of_another_tokenizer_get_no_perplexity(tiny_sft_model, tiny_tokens, tmp_path, capsys):
    """Validation shards tokenized with another vocabulary than a model's (the default out/tokens beside a model
    from elsewhere) are not scored with it: a line says why, its val_ppl stays empty, the rest of the report runs."""
    from conftest import shards_of_another_vocabulary

    other = tmp_path / "tokens" / "val"
    theirs, others = shards_of_another_vocabulary(tiny_tokens / "sft" / "val", other)
    main(["--models", str(tiny_sft_model), "--val", str(other), "--tasks", "none", "--bpb_texts", "none",
          "--heldout", "none", "--prompts", QUESTION, "--max_new_tokens", "4", "--out_dir", str(tmp_path / "eval")])
    assert (f"[evaluate] sft/final: {other} was tokenized with a {others}-token vocabulary, the model's "
            f"tokenizer has {theirs} (another tokenizer); no perplexity for it") in capsys.readouterr().out
    report, = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]
    assert report["val_ppl"] is None and QUESTION in report["samples"]


def test_out_of_gpu_memory_is_one_line(tiny_sft_model, tiny_tokens, tmp_path, monkeypatch):
    """torch's CUDA out-of-memory error (raised where the perplexity pass would; no GPU here) ends stage 6 with one
    line naming the failed allocation and the flag to lower."""
    import mateconv.evaluate.models as models

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of "
                                     "23.55 GiB of which 512.00 MiB is free. Of the allocated memory 21.9 GiB ...")

    monkeypatch.setattr(models, "perplexity", out_of_memory)
    with pytest.raises(SystemExit) as stopped:
        main(["--models", str(tiny_sft_model), "--val", str(tiny_tokens / "sft" / "val"), "--out_dir",
              str(tmp_path / "eval"), "--batch_size", "32"])
    assert str(stopped.value) == ("evaluate: out of GPU memory (Tried to allocate 1.50 GiB; total capacity of 23.55 "
                                  "GiB of which 512.00 MiB is free) at --batch_size 32: lower it, or use --device cpu; "
                                  "the models are not changed")


@pytest.mark.slow
def test_notebook_runs_with_parameters(inputs, tmp_path):
    notebook = nbformat.read(ROOT / "6.inference_evaluate.ipynb", as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = {"MODELS": [*inputs["models"], str(tmp_path / "not_trained_yet")], "VAL": inputs["val"],
                 "TASKS": inputs["tasks"], "OUT_DIR": str(tmp_path / "eval"), "PROMPTS": [QUESTION, "Who are you?"],
                 "MAX_NEW_TOKENS": 8, "BPB_TEXTS": str(tmp_path / "pretrain_vall.jsonl")}
    source = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute(env=ENV)
    check_outputs(tmp_path / "eval", inputs)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # plots are shown inline
    assert any("not_trained_yet" in o.get("text", "") for o in outputs)  # missing checkpoints are reported
    # so is missing data (a typo in a path had the notebook leave that metric out without a word)
    assert any(f"{tmp_path / 'pretrain_vall.jsonl'} not found or empty; skipping it" in o.get("text", "")
               for o in outputs)
    curves = next(cell for cell in notebook.cells if "training.png" in cell.source and cell.cell_type == "code")
    assert any("image/png" in o.get("data", {}) for o in curves.outputs)  # the trained models' training curves


def quick_run(models: list, out: Path, *flags: str) -> list[str]:
    """Stage 6 with samples only (one prompt, 4 tokens) besides `flags`."""
    return ["--models", *map(str, models), "--val", "none", "--tasks", "none", "--bpb_texts", "none", "--heldout",
            "none", "--prompts", QUESTION, "--max_new_tokens", "4", "--out_dir", str(out), *flags]


def test_shards_of_another_tokenizer_of_the_same_size_get_no_perplexity(tiny_sft_model, tiny_tokens, tiny_tokenizer,
                                                                       tmp_path, capsys):
    """The shards' own tokenizer (index.json names its directory) is compared with the model's, not only its size: one
    with two tokens' ids swapped gets no perplexity. Where that directory is gone, the sizes are compared (a note)."""
    import shutil

    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_tokenizer, other_tokenizer)
    serialized = json.loads((other_tokenizer / "tokenizer.json").read_text())
    vocab = serialized["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(serialized))
    shards = tmp_path / "tokens" / "val"
    shutil.copytree(tiny_tokens / "sft" / "val", shards)
    index = json.loads((shards / "index.json").read_text())
    for made_by in (other_tokenizer, tmp_path / "gone"):
        (shards / "index.json").write_text(json.dumps({**index, "tokenizer": str(made_by)}))
        main(quick_run([tiny_sft_model], tmp_path / "eval", "--val", str(shards)))
        report, = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]
        printed = capsys.readouterr().out
        if made_by == other_tokenizer:
            assert (f"[evaluate] sft/final: {shards} was tokenized by {other_tokenizer}, whose vocabulary or merges "
                    "are not the model's (another tokenizer); no perplexity for it") in printed
            assert report["val_ppl"] is None
        else:
            assert (f"[evaluate] {shards}: the tokenizer that made it ({made_by}) cannot be compared with the "
                    "model's; only the vocabulary sizes are, and they agree") in printed
            assert report["val_ppl"] < 3.0


def test_a_failed_model_leaves_the_others_results(tiny_sft_model, tiny_tokens, tmp_path):
    """A model that cannot be evaluated (here: its tokenizer lost its chat template) is named in one line at the end;
    the summaries still hold the other models, and the failed one with its reason. In the pipeline the failed stage
    is not done: its summary.json goes, so that the next run evaluates again."""
    broken = tmp_path / "broken" / "final"
    shutil.copytree(tiny_sft_model, broken)
    (broken / "chat_template.jinja").unlink()
    config = json.loads((broken / "tokenizer_config.json").read_text())
    del config["chat_template"]  # kept there too, for loaders from before chat_template.jinja
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as stopped:
        main(quick_run([broken, tiny_sft_model], tmp_path / "eval", "--val", str(tiny_tokens / "sft" / "val")))
    reason = f"the tokenizer in {broken} has no chat template"
    assert str(stopped.value) == (f"evaluate: not evaluated: broken/final: {reason} (the summaries hold the other "
                                  "models)")
    failed, good = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]
    assert failed["error"] == reason and failed["val_ppl"] is None and failed["params_M"] is None
    assert good["model"] == "sft/final" and good["val_ppl"] < 3.0 and "error" not in good
    assert "| broken/final | failed |" in (tmp_path / "eval" / "summary.md").read_text()

    from mateconv.pipeline import run

    args = {"models": [str(broken), str(tiny_sft_model)], "val": "none", "tasks": "none", "bpb_texts": "none",
            "heldout": "none", "prompts": [QUESTION], "max_new_tokens": 4, "out_dir": str(tmp_path / "out" / "eval")}
    preset = {"stages": {"eval": {"module": "mateconv.evaluate", "args": args, "done": "out/eval/summary.json"}}}
    assert run(preset, None, tmp_path / "logs", tmp_path / "out") == 1
    assert (tmp_path / "out" / "eval" / "summary.md").is_file()
    assert not (tmp_path / "out" / "eval" / "summary.json").exists()


def evaluated_copies(model: Path, copies: list[Path], tasks: Path, out: Path) -> tuple[list[str], list[str]]:
    """Copies of `model` at the paths `copies`, evaluated on one task each: the labels summary.json gives them and the
    names of the task-answer files written."""
    for copy in copies:
        shutil.copytree(model, copy)
    main(quick_run(copies, out, "--tasks", str(tasks), "--max_tasks", "1"))
    summary = json.loads((out / "summary.json").read_text())
    return [m["model"] for m in summary["models"]], sorted(p.name for p in out.glob("tasks_*.jsonl"))


def test_checkpoints_alike_in_their_last_parts_get_distinct_labels(tiny_sft_model, tiny_embedded_data, tmp_path):
    """out/sft/final and runB/sft/final are labelled by three path parts each, so that neither overwrites the other's
    outputs; one checkpoint named twice is refused in one line."""
    models = [tmp_path / run / "sft" / "final" for run in ("out", "runB")]
    labels, task_files = evaluated_copies(tiny_sft_model, models, tiny_embedded_data / "tasks_val.jsonl",
                                          tmp_path / "eval")
    assert labels == ["out/sft/final", "runB/sft/final"]
    assert task_files == ["tasks_out_sft_final.jsonl", "tasks_runB_sft_final.jsonl"]
    with pytest.raises(SystemExit) as stopped:
        main(quick_run([models[0], tmp_path / "out" / "sft" / ".." / "sft" / "final"], tmp_path / "eval"))
    assert str(stopped.value) == (f"evaluate: --models names the checkpoint "
                                  f"{tmp_path / 'out' / 'sft' / '..' / 'sft' / 'final'} twice")


def test_labels_whose_file_names_would_collide_get_more_of_their_path(tiny_sft_model, tiny_embedded_data, tmp_path,
                                                                      monkeypatch):
    """x/a_b/final and y/a/b_final have different labels but the same file name (a_b_final): the second model's
    tasks_*.jsonl and parts/model_*.json overwrote the first's. They are labelled by more of their paths; two given
    with no more parts to tell them apart are refused in one line."""
    models = [tmp_path / "x" / "a_b" / "final", tmp_path / "y" / "a" / "b_final"]
    labels, task_files = evaluated_copies(tiny_sft_model, models, tiny_embedded_data / "tasks_val.jsonl",
                                          tmp_path / "eval")
    assert labels == ["x/a_b/final", "y/a/b_final"]
    assert task_files == ["tasks_x_a_b_final.jsonl", "tasks_y_a_b_final.jsonl"]
    monkeypatch.chdir(tmp_path / "x")
    shutil.copytree(tiny_sft_model, "a/b_final")
    with pytest.raises(SystemExit) as stopped:
        main(quick_run([Path("a_b/final"), Path("a/b_final")], tmp_path / "eval"))
    assert str(stopped.value) == ("evaluate: --models a_b/final and a/b_final would write their results to the same "
                                  "files (named a_b_final): give one of them another folder name")


@pytest.mark.parametrize("flag", ["--bpb_texts", "--tasks"])
def test_an_empty_file_given_is_one_line(tiny_sft_model, tmp_path, flag):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as stopped:
        main(quick_run([tiny_sft_model], tmp_path / "eval", flag, str(empty)))
    what = "no documents to score for bits per byte" if flag == "--bpb_texts" else "no task records"
    assert str(stopped.value) == f"evaluate: {empty}: {what} (the file is empty)"


def shipped_llama(shipped: Path, tokenizer: Path, model_type: str) -> Path:
    """A random tiny Llama saved at `shipped` as a model type transformers does not know (`model_type`), with the code
    that loads it (auto_map), as MiniMind's converted models are."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=64)).save_pretrained(shipped)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(shipped)
    (shipped / "shipped_model.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        f"class ShippedConfig(LlamaConfig):\n    model_type = {model_type!r}\n\n\n"
        "class ShippedForCausalLM(LlamaForCausalLM):\n    config_class = ShippedConfig\n")
    config = json.loads((shipped / "config.json").read_text())
    auto_map = {"AutoConfig": "shipped_model.ShippedConfig", "AutoModelForCausalLM": "shipped_model.ShippedForCausalLM"}
    (shipped / "config.json").write_text(json.dumps({**config, "model_type": model_type, "auto_map": auto_map}))
    return shipped


def test_bad_tasks_and_counts_stop_before_any_model_loads(tmp_path):
    """A task record without its answer is named by file:line before any model loads (each model was loaded, then
    failed with no line named); a count below its least stops the run in one line (--batch_size 0 was a traceback,
    --max_tasks -1 silently left out the last task), and so does an --out_dir that is a file (a traceback)."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "t1", "messages": [], "answer": "7"}\n{"id": "t2", "messages": []}\n')
    nothing = tmp_path / "no_model"  # never loaded: the run stops first
    (nothing / "config.json").parent.mkdir()
    (nothing / "config.json").write_text("{}")
    cases = [(["--tasks", str(tasks)], f"{tasks}:2: a task record needs 'messages' and 'answer'"),
             (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
             (["--max_tasks", "-1"], "--max_tasks must be at least 1 (0 = all), got -1"),
             (["--judge_concurrency", "0"], "--judge_concurrency must be at least 1, got 0"),
             (["--out_dir", str(tasks)], f"--out_dir: cannot create the directory {tasks} (File exists: {tasks})")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as stopped:
            main(quick_run([nothing], tmp_path / "eval", *flags))
        assert str(stopped.value).startswith(f"evaluate: {message}")


def test_a_model_that_ships_its_code_needs_trust_remote_code(tiny_tokenizer, tmp_path):
    """A checkpoint whose config.json maps a model type transformers does not know to code of its own (MiniMind's
    converted models) is refused in one line without --trust_remote_code (transformers would ask on stdin), and
    evaluated with it."""
    shipped = shipped_llama(tmp_path / "shipped" / "final", tiny_tokenizer, "shipped_llama")
    with pytest.raises(SystemExit) as stopped:
        main(quick_run([shipped], tmp_path / "eval"))
    assert str(stopped.value) == (f"evaluate: {shipped} ships its own model code (auto_map in config.json); pass "
                                  "--trust_remote_code to run it")
    main(quick_run([shipped], tmp_path / "eval", "--trust_remote_code"))
    report, = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]
    assert report["model"] == "shipped/final" and QUESTION in report["samples"]


def test_bits_per_byte_starts_documents_as_the_model_was_pretrained(tiny_tokenizer, tiny_embedded_data, tmp_path):
    """MiniMind pretrains on BOS + document: its models' documents are scored after BOS by default (ours after EOS, as
    packed), and --bpb_start picks either; the figures are bits_per_byte's own with that start token."""
    from mateconv.chat import load_model
    from mateconv.logprobs import bits_per_byte

    minimind = shipped_llama(tmp_path / "minimind" / "final", tiny_tokenizer, "minimind")
    texts = tmp_path / "texts.txt"
    texts.write_text("The sea is calm tonight.\nTwo and two make four.\n")
    model, tokenizer = load_model(minimind, device="cpu", trust_remote_code=True)
    direct = {start: bits_per_byte(model, tokenizer, texts.read_text().splitlines(), seq_len=64,
                                   start_ids=[getattr(tokenizer, f"{start}_token_id")]).bpb for start in ("bos", "eos")}
    assert tokenizer.bos_token_id != tokenizer.eos_token_id and direct["bos"] != direct["eos"]
    for flags, start in (([], "bos"), (["--bpb_start", "eos"], "eos"), (["--bpb_start", "bos"], "bos")):
        main(quick_run([minimind], tmp_path / "eval", "--trust_remote_code", "--bpb_texts", str(texts), *flags))
        report, = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]
        assert report["bpb"]["start"] == start and report["val_bpb"] == pytest.approx(direct[start], abs=1e-4)


def test_bpb_texts_are_each_records_text_as_pretraining_takes_it(tiny_sft_model, tmp_path):
    """--bpb_texts reads what stage 2 reads for pretraining: MiniMind's conversations and LLaMA-Factory's alpaca
    records count as their turns' text (record_text), scored as the same documents written as {"text"} records."""
    from mateconv.data.readers import record_text

    records = [{"conversations": [{"role": "user", "content": "What is 3 plus 4?"},
                                  {"role": "assistant", "content": "It is 7."}]},
               {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": record_text(r)}) + "\n" for r in records))
    bpb = {}
    for name in ("mixed", "texts"):
        main(quick_run([tiny_sft_model], tmp_path / name, "--bpb_texts", str(tmp_path / f"{name}.jsonl")))
        report, = json.loads((tmp_path / name / "summary.json").read_text())["models"]
        bpb[name] = (report["val_bpb"], report["bpb"])
    assert bpb["mixed"] == bpb["texts"] and bpb["texts"][1]["documents"] == 2


def test_val_documents_in_any_text_field_stage_2_reads(tiny_sft_model, tmp_path):
    """--val takes {"content"} and {"paragraphs"} documents as stage 2 does (they were refused as an unknown record
    shape), scored as the same {"text"} documents."""
    texts = ["The sea is calm tonight.", "Two and two make four.\nFour and four make eight."]
    shapes = {"text": [{"text": t} for t in texts], "content": [{"content": t} for t in texts],
              "paragraphs": [{"paragraphs": t.split("\n")} for t in texts]}
    scores = {}
    for name, records in shapes.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        main(quick_run([tiny_sft_model], tmp_path / name, "--val", str(tmp_path / f"{name}.jsonl")))
        report, = json.loads((tmp_path / name / "summary.json").read_text())["models"]
        scores[name] = (report["val_loss"], report["val_tokens"])
    assert scores["content"] == scores["paragraphs"] == scores["text"] and scores["text"][1] > 10


def test_seed_mode_test_skips_empty_held_out_files_under_its_root(tiny_sft_model, tiny_embedded_data, tmp_path,
                                                                   capsys):
    """`pretrain_sft_lora.py --mode test --out_dir R` evaluates R/sft/final; R/data's empty tasks file and missing
    shards are skipped as `python -m mateconv.evaluate` skips its defaults, not an error; present data is used."""
    from mateconv.evaluate.cli import seed_test_main

    root = tmp_path / "run"
    shutil.copytree(tiny_sft_model, root / "sft" / "final")
    (root / "data").mkdir()
    (root / "data" / "tasks_val.jsonl").write_text("")
    shutil.copy(tiny_embedded_data / "sft_val.jsonl", root / "data" / "sft_val.jsonl")
    seed_test_main(["--out_dir", str(root), "--device", "cpu", "--batch_size", "2"])
    printed = capsys.readouterr().out
    assert f"{root}/data/tasks_val.jsonl not found or empty; skipping it" in printed
    assert f"{root}/tokens/pretrain/val not found or empty; skipping it" in printed
    summary = json.loads((root / "eval" / "summary.json").read_text())
    [model] = summary["models"]
    assert model["task_accuracy"] is None and model["val_ppl"] is None and model["samples"]


def test_held_out_files_in_the_shapes_stage_2_reads(tiny_sft_model, tiny_embedded_data, tmp_path):
    """--val and --heldout take MiniMind's {"conversations": [{role, content}]} JSON Lines and a LLaMA-Factory-style
    .json array of them as the same conversations as {"messages"} JSON Lines; --bpb_texts takes a .txt of one document
    per line as the same documents as {"text"} JSON Lines."""
    records = [json.loads(line) for line in (tiny_embedded_data / "sft_val.jsonl").read_text().splitlines()[:6]]
    texts = [json.loads(line)["text"] for line in (tiny_embedded_data / "pretrain_val.jsonl").read_text().splitlines()]
    texts = [text[:100].replace("\n", " ") for text in texts[:3]]
    minimind = [{"conversations": r["messages"]} for r in records]
    one_per_line = "\n".join(texts) + "\n"
    inputs = {  # (conversations file, its content, documents file, its content)
        "messages": ("messages.jsonl", "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records),
                     "texts.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts)),
        "minimind": ("minimind.jsonl", "".join(json.dumps(r) + "\n" for r in minimind), "texts.txt", one_per_line),
        "array": ("array.json", json.dumps(minimind, indent=1), "texts.txt", one_per_line)}
    summaries = {}
    for label, (held_out, conversations, documents, texts_content) in inputs.items():
        (tmp_path / held_out).write_text(conversations)
        (tmp_path / documents).write_text(texts_content)
        main(["--models", str(tiny_sft_model), "--val", str(tmp_path / held_out), "--heldout", str(tmp_path / held_out),
              "--tasks", "none", "--bpb_texts", str(tmp_path / documents), "--n_samples", "2", "--max_new_tokens", "4",
              "--out_dir", str(tmp_path / label)])
        summaries[label] = json.loads((tmp_path / label / "summary.json").read_text())["models"][0]
    reference = summaries.pop("messages")
    assert reference["val_tokens"] > 0 and reference["bpb"]["documents"] == 3
    assert list(reference["samples"]) == [r["messages"][0]["content"] for r in records[:2]]
    for summary in summaries.values():
        for field in ("val_loss", "val_tokens", "samples", "val_bpb", "bpb"):
            assert summary[field] == reference[field]


def test_a_bad_or_empty_validation_file_stops_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"prompt": "x"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_model = tmp_path / "no_model"  # would fail to load: the files are read first
    no_model.mkdir()
    (no_model / "config.json").write_text("{}")
    for path, message in ((bad, f"{bad}:3: unknown record shape with keys ['prompt']"),
                          (empty, f"{empty}: no records to score for perplexity (the file is empty)")):
        with pytest.raises(SystemExit) as stopped:
            main(quick_run([no_model], tmp_path / "eval", "--val", str(path)))
        assert str(stopped.value).startswith(f"evaluate: {message}")
    with pytest.raises(SystemExit) as stopped:  # rows of one token would score nothing (and never end)
        main(quick_run([no_model], tmp_path / "eval", "--val", str(bad), "--seq_len", "1"))
    assert str(stopped.value) == "evaluate: --seq_len must be at least 2, got 1"


def test_the_notebook_keeps_training_checkpoints(tiny_sft_model, tmp_path):
    """The notebook evaluates the MODELS that `is_model` finds: a run's checkpoints/step_N as well as final/ (it looked
    for config.json only and skipped a checkpoint as not found)."""
    checkpoint = tiny_sft_model.parent / "checkpoints" / "step_00000300"
    assert [is_model(path) for path in (tiny_sft_model, checkpoint, tmp_path / "missing", tmp_path)] == [
        True, True, False, False]
    notebook = nbformat.read(ROOT / "6.inference_evaluate.ipynb", as_version=4)
    cell = next(cell.source for cell in notebook.cells if "is_model(m)" in cell.source)
    picking = cell[cell.index("named = "):cell.index("# each data file")]  # the cell's choice of models, run here
    for given, picked in (([str(checkpoint), str(tmp_path / "missing")], [str(checkpoint)]),
                          (str(tiny_sft_model), [str(tiny_sft_model)])):  # one path as a string: not its characters
        scope = {"MODELS": given, "path_list": path_list, "is_model": is_model}
        exec(picking, scope)
        assert scope["models"] == picked


def test_one_model_path_as_a_string_is_one_model(tmp_path):
    """`evaluate("out/sft/final", ...)` took the path's characters for models ('no model at o')."""
    with pytest.raises(EvalError, match=f"^no model at {tmp_path / 'missing'} "):
        evaluate(str(tmp_path / "missing"), tmp_path / "eval")
