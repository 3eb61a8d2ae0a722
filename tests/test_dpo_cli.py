"""9.train_dpo.py: bad input gives a one-line error naming the problem."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mateconv.config import parse_config
from mateconv.train.models import build_model
from mateconv.train.command import main
from mateconv.train.stages import RECIPES
from model import MateConvConfig, MateConvForCausalLM, MoEFeedForward
from model.modeling import Attention
from tests.test_data_formats import GOOD_PAIRS, write_pairs_file


@pytest.mark.parametrize("argv,message", [
    (["--init_from", "/nonexistent/sft"], "init_from: /nonexistent/sft does not exist (a model directory"),
    (["--init_from", "out_missing/sft/final"], "init_from: out_missing/sft/final does not exist (a model directory "
                                               "written by save_pretrained, which 5.full_sft.py writes there, or a "
                                               "Hugging Face hub id)"),
    (["--init_from", str(Path(__file__).parent)], f"init_from: {Path(__file__).parent} is not a model directory: it "
                                                   "has no config.json (name one written by save_pretrained"),
    (["--dpo_loss_type", "kto"], "loss_type must be one of sigmoid, ipo, hinge"),
    (["--kl_coeff", "0.05"], "unknown config key 'kl_coeff'; did you mean 'dpo_kl_coef'?"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as error:
        main("dpo", argv + ["--tracker", "none", "--engine", "torch", "--device", "cpu"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_local_path_is_told_from_a_hub_id(tmp_path, monkeypatch):
    """A model path that does not exist is named as such when it was meant as a directory here; hub ids ('name',
    'namespace/name') still go to transformers, which downloads them where it can."""
    from mateconv.hub import meant_as_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert [meant_as_local(p) for p in ("/abs/model", "./model", "../model", "a/b/c", "out/sft")] == [True] * 5
    assert [meant_as_local(p) for p in ("gpt2", "Qwen/Qwen2.5-0.5B")] == [False, False]


def test_a_hub_id_with_no_network_is_one_line_at_once(tmp_path, monkeypatch):
    """A hub id that is not cached, where the hub's host does not resolve, is told at once (huggingface_hub would retry
    for half a minute, then transformers' several-line message)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as error:
        main("dpo", ["--init_from", "nobody/no-model", "--tracker", "none", "--engine", "torch", "--device", "cpu"])
    assert str(error.value).endswith("init_from: nobody/no-model is not a directory here nor in the Hugging Face "
                                     "cache, and hub.invalid cannot be reached to download it (download it where "
                                     "there is a network, or name a local directory)")


def test_missing_shards_and_files_are_named(tiny_llama, tmp_path):
    """Missing shards, and a named data file that is missing (validation too: not silently off)."""
    tiny_llama(0).save_pretrained(tmp_path / "sft")
    (tmp_path / "pairs.jsonl").write_text("")
    flags = ["--init_from", str(tmp_path / "sft"), "--tracker", "none", "--engine", "torch", "--device", "cpu",
             "--out_dir", str(tmp_path / "out")]
    for data, message in [(["--data_path", str(tmp_path / "missing")], "DPO token shards not found: .*missing"),
                          (["--data_path", str(tmp_path / "missing.jsonl")],
                           "^dpo: DPO data file not found: .*missing.jsonl$"),
                          (["--data_path", str(tmp_path / "pairs.jsonl"), "--val_data_path", "val.json"],
                           "^dpo: DPO data file not found: val.json$")]:
        with pytest.raises(SystemExit, match=message):
            main("dpo", flags + data)


def test_a_missing_pairs_file_names_the_one_stage_7_wrote(tiny_llama, tmp_path, monkeypatch):
    """Seed 004 runs stage 7, then DPO with `--pairs_path ./dataset/dpo_pairs.jsonl`; stage 7 writes
    out/prefs/dpo_pairs.jsonl, which the error then names."""
    monkeypatch.chdir(tmp_path)
    tiny_llama(0).save_pretrained("out/sft/final")
    Path("out/prefs").mkdir(parents=True)
    Path("out/prefs/dpo_pairs.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"^dpo: DPO data file not found: dataset/dpo_pairs.jsonl \(stage 7 wrote its "
                                         r"pairs to out/prefs/dpo_pairs.jsonl\)$"):
        main("dpo", ["--pairs_path", "./dataset/dpo_pairs.jsonl", "--tracker", "none", "--device", "cpu"])


def test_run_without_held_out_data_saves_the_model_and_no_plot(tiny_sft_model, tiny_tokens, tmp_path):
    from conftest import TINY_MODEL_FLAGS

    out = tmp_path / "dpo"
    assert main("dpo", TINY_MODEL_FLAGS + [
        "--init_from", str(tiny_sft_model), "--data_path", str(tiny_tokens / "dpo" / "train"), "--val_data_path", "",
        "--forget_data_paths", "", "--out_dir", str(out), "--batch_size", "8", "--max_steps", "3",
        "--save_interval_steps", "3", "--log_interval", "1"]) == 0
    assert (out / "final" / "model.safetensors").exists() and not (out / "forgetting.png").exists()
    assert all("forget/sft_ppl" not in line for line in (out / "metrics.jsonl").read_text().splitlines())


def test_forgetting_shards_of_another_tokenizer_are_skipped(tiny_sft_model, tiny_tokens, tmp_path, capsys):
    """A forgetting set tokenized with another vocabulary than the pairs (an earlier run's out/tokens, which the
    default paths find) is skipped with a line saying why, instead of feeding the model token ids it may not have;
    the matching set is still measured."""
    from conftest import TINY_MODEL_FLAGS, shards_of_another_vocabulary

    other = tmp_path / "other_run" / "tokens" / "pretrain" / "val"
    theirs, others = shards_of_another_vocabulary(tiny_tokens / "pretrain" / "val", other)
    out = tmp_path / "dpo"
    assert main("dpo", TINY_MODEL_FLAGS + [
        "--init_from", str(tiny_sft_model), "--data_path", str(tiny_tokens / "dpo" / "train"), "--val_data_path", "",
        "--forget_data_paths", str(other), str(tiny_tokens / "sft" / "val"), "--out_dir", str(out), "--batch_size",
        "8", "--max_steps", "2", "--eval_interval", "2", "--eval_batches", "1", "--tracker", "none"]) == 0
    assert (f"[dpo] forgetting eval: {other} was tokenized with a {others}-token vocabulary, the "
            f"preference pairs with {theirs}: another tokenizer, skipped") in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("forget/sft_ppl" in row for row in rows) and not any("forget/pretrain_ppl" in row for row in rows)


def test_a_forgetting_set_without_a_labelled_token_within_max_seq_len_is_skipped(tiny_sft_model, tiny_tokens,
                                                                                  tiny_tokenizer, tmp_path, capsys):
    """SFT conversations whose prompts fill max_seq_len have nothing to measure: their set is skipped with a line,
    instead of stopping DPO at its first evaluation."""
    from conftest import TINY_MODEL_FLAGS
    from mateconv.data.tokenizing import build_shards

    rules = {"role": "system", "content": " ".join(["Answer politely and check every fact twice."] * 20)}
    record = {"messages": [rules, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "long.jsonl").write_text(json.dumps(record) + "\n")
    long_prompts = build_shards("sft", [tmp_path / "long.jsonl"], tiny_tokenizer, tmp_path / "long" / "val",
                                workers=1, progress=False).out_dir
    out = tmp_path / "dpo"
    assert main("dpo", TINY_MODEL_FLAGS + [
        "--init_from", str(tiny_sft_model), "--data_path", str(tiny_tokens / "dpo" / "train"), "--val_data_path", "",
        "--forget_data_paths", str(long_prompts), str(tiny_tokens / "sft" / "val"), "--out_dir", str(out),
        "--batch_size", "8", "--max_steps", "2", "--eval_interval", "2", "--eval_batches", "1", "--tracker",
        "none"]) == 0
    assert (f"[dpo] forgetting eval: {long_prompts} has no labelled token within max_seq_len 96, skipped"
            in capsys.readouterr().out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("forget/sft_ppl" in row for row in rows) and not any("forget/long_ppl" in row for row in rows)


@pytest.mark.parametrize("stage, data", [("sft", "sft"), ("dpo", "dpo")])
def test_a_starting_model_takes_the_length_given(stage, data, tiny_pretrain_model, tiny_tokens, tmp_path, capsys):
    """The tiny model was trained on 96-token rows. The stages' default max_seq_len (512) is cut to its 96; a longer
    one given (seed 000's DPO lines give 3000 after pretraining at 512) extends its positions, with a note, for the
    policy and DPO's reference alike, and the saved model takes that length. Before: a one-line refusal."""
    flags = ["--init_from", str(tiny_pretrain_model), "--data_path", str(tiny_tokens / data / "train"),
             "--val_data_path", "", "--tracker", "none", "--engine", "torch", "--device", "cpu",
             "--forget_data_paths", "", "--out_dir", str(tmp_path / "run"), "--batch_size", "4", "--max_steps", "2"]
    assert parse_config(flags, RECIPES[stage].defaults).model.max_seq_len == 96
    assert main(stage, [*flags, "--max_seq_len", "160"]) == 0
    assert (f"[{stage}] note: {tiny_pretrain_model} was trained on rows of up to 96 tokens; max_seq_len 160 extends "
            "its positions (RoPE) for this run and the model it saves") in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["max_seq_len"] == 160


def training_only_values(model) -> set:
    """Each dropout probability (nn.Dropout's and the attention's) and each MoE layer's (aux_loss_alpha, seq_aux)."""
    return ({("p", m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)}
            | {("attention", m.dropout) for m in model.modules() if isinstance(m, Attention)}
            | {("aux", m.aux_loss_alpha, m.seq_aux) for m in model.modules() if isinstance(m, MoEFeedForward)})


@pytest.mark.parametrize("stage, data", [("sft", "sft"), ("dpo", "dpo")])
def test_a_starting_model_trains_with_another_dropout(stage, data, tiny_pretrain_model, tiny_tokens, tmp_path,
                                                      capsys):
    """Dropout changes no parameter: SFT or DPO from a model pretrained without it may set it (MiniMind's SFT does);
    the loaded model's dropouts take it and the saved model and checkpoints record it; a resume may change it again,
    with a note. A setting that changes the model's shape is still refused. Before: 'init_from ... is the model this
    run trains, as it is: dropout 0.1 (it has 0.0)'."""
    flags = ["--init_from", str(tiny_pretrain_model), "--data_path", str(tiny_tokens / data / "train"),
             "--val_data_path", "", "--tracker", "none", "--engine", "torch", "--device", "cpu",
             "--forget_data_paths", "", "--out_dir", str(tmp_path / "run"), "--batch_size", "4", "--max_steps", "2",
             "--save_interval_steps", "2", "--dropout", "0.1"]
    assert training_only_values(build_model(parse_config(flags, RECIPES[stage].defaults))) == {("p", 0.1),
                                                                                               ("attention", 0.1)}
    assert main(stage, flags) == 0
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["dropout"] == 0.1
    assert main(stage, [*flags, "--max_steps", "3", "--dropout", "0.2"]) == 0
    assert "changed since the checkpoint: dropout 0.1 -> 0.2" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["dropout"] == 0.2
    with pytest.raises(SystemExit, match=rf"^{stage}: init_from .* is the model this run trains, as it is: dim 128 "
                                         r"\(it has 64\); drop those model flags"):
        main(stage, [*flags, "--out_dir", str(tmp_path / "other"), "--dim", "128"])


def test_a_starting_moe_model_trains_with_another_balance_loss(tiny_tokenizer, tiny_tokens, tmp_path):
    """aux_loss_alpha and seq_aux weigh the experts' balance loss in training only: SFT of an MoE model may change
    them, for its gates and its saved config; n_routed_experts is the model's shape, still refused."""
    start = tmp_path / "moe"
    MateConvForCausalLM(MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=96,
                                       use_moe=True)).save_pretrained(start)
    flags = ["--init_from", str(start), "--tokenizer_path", str(tiny_tokenizer), "--data_path",
             str(tiny_tokens / "sft" / "train"), "--val_data_path", "", "--tracker", "none", "--engine", "torch",
             "--device", "cpu", "--out_dir", str(tmp_path / "run"), "--batch_size", "4", "--max_steps", "1",
             "--aux_loss_alpha", "0.01", "--seq_aux", "0"]
    assert ("aux", 0.01, False) in training_only_values(build_model(parse_config(flags, RECIPES["sft"].defaults)))
    assert main("sft", flags) == 0
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert (saved["aux_loss_alpha"], saved["seq_aux"]) == (0.01, False)
    with pytest.raises(SystemExit, match=r"n_routed_experts 8 \(it has 4\)"):
        main("sft", [*flags, "--n_routed_experts", "8"])


def test_pairs_path_trains_on_the_good_pairs_and_names_the_bad_ones(tiny_sft_model, tmp_path, capsys):
    """A user's own preference file given to stage 9 as it is: the bad records are skipped with the lines stage 2
    gives for them (tests/test_data_prepare.py), the rest train."""
    from conftest import TINY_MODEL_FLAGS

    pairs = tmp_path / "pairs.jsonl"
    expected = write_pairs_file(pairs)
    assert main("dpo", TINY_MODEL_FLAGS + [
        "--init_from", str(tiny_sft_model), "--pairs_path", str(pairs), "--val_data_path", "",
        "--forget_data_paths", "", "--out_dir", str(tmp_path / "dpo"), "--batch_size", "2", "--max_steps", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.removeprefix("[dpo] skipped ") for line in out if line.startswith("[dpo] skipped ")] == expected[:5]
    assert f"[dpo] ... {len(expected)} bad records in all" in out
    assert any(line.startswith(f"[dpo] {pairs}: {len(GOOD_PAIRS)} records, ") for line in out)


def test_pairs_path_beside_shards_of_other_data_names_them(tiny_sft_model, tiny_tokens, tmp_path, capsys):
    """A user's raw pairs file, validated on shards of other data (the stage's default out/tokens/dpo/val when an
    earlier run left it): the log says whose pairs the validation figures are (they were silently the demo's)."""
    from conftest import TINY_MODEL_FLAGS

    pairs = tmp_path / "pairs.jsonl"
    write_pairs_file(pairs)
    val = tiny_tokens / "dpo" / "val"
    assert main("dpo", TINY_MODEL_FLAGS + [
        "--init_from", str(tiny_sft_model), "--pairs_path", str(pairs), "--val_data_path", str(val),
        "--forget_data_paths", "", "--out_dir", str(tmp_path / "dpo"), "--batch_size", "2", "--max_steps", "1"]) == 0
    inputs = ", ".join(json.loads((val / "index.json").read_text())["inputs"])
    assert (f"[dpo] validation: {val} (tokenized from {inputs}, not from {pairs}; --val_data_path FILE names yours, "
            "'' turns validation off)") in capsys.readouterr().out


def test_an_empty_pairs_file_is_one_line_and_an_empty_validation_file_turns_validation_off(tiny_sft_model, tmp_path):
    """An empty pairs file (a stage 7 run whose prompts were all dropped, say) stopped DPO with a traceback from the
    sampler, an empty validation file with a KeyError at the first evaluation."""
    from conftest import TINY_MODEL_FLAGS

    pairs, empty = tmp_path / "pairs.jsonl", tmp_path / "empty.jsonl"
    write_pairs_file(pairs)
    empty.write_text("")
    flags = TINY_MODEL_FLAGS + ["--init_from", str(tiny_sft_model), "--forget_data_paths", "", "--batch_size", "2",
                                "--max_steps", "1"]
    with pytest.raises(SystemExit, match=f"^dpo: DPO training data holds no records: {empty}$"):
        main("dpo", flags + ["--pairs_path", str(empty), "--val_data_path", "", "--out_dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=f"^dpo: DPO training data holds no records outside the val_size 0.99 held "
                                         f"out for validation: {pairs}$"):
        main("dpo", flags + ["--pairs_path", str(pairs), "--val_size", "0.99", "--out_dir", str(tmp_path / "c")])
    assert main("dpo", flags + ["--pairs_path", str(pairs), "--val_data_path", str(empty),
                                "--out_dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "final" / "model.safetensors").exists()
    assert not any("val_loss" in row for row in map(json.loads, (tmp_path / "b" / "metrics.jsonl").open()))


@pytest.mark.parametrize("precompute", [False, True])
def test_a_reference_of_a_smaller_vocabulary_is_one_line(precompute, tiny_sft_model, tiny_llama, tmp_path):
    """A reference model that cannot embed the pairs' token ids (another tokenizer's) stopped DPO with an IndexError
    traceback from its first forward (a device-side assert on a GPU)."""
    from conftest import TINY_MODEL_FLAGS

    pairs, reference = tmp_path / "pairs.jsonl", tmp_path / "ref"
    write_pairs_file(pairs)
    tiny_llama(0, vocab_size=50).save_pretrained(reference)
    with pytest.raises(SystemExit, match=rf"^dpo: the training data.s token ids need a vocabulary of 512 but the reference model "
                                         rf"{reference} has 50 embeddings \(ref_model_path: a model of the policy's "
                                         rf"tokenizer\)$"):
        main("dpo", TINY_MODEL_FLAGS + [
            "--init_from", str(tiny_sft_model), "--pairs_path", str(pairs), "--val_data_path", "",
            "--forget_data_paths", "", "--ref_model_path", str(reference), "--out_dir", str(tmp_path / "dpo"),
            "--batch_size", "2", "--max_steps", "1", "--precompute_ref", str(precompute).lower()])


def test_pairs_longer_than_max_seq_len_are_told_and_keep_their_responses(tiny_sft_model, tiny_tokens, tmp_path,
                                                                         capsys):
    """Pairs cut to max_seq_len are told; those left with the same chosen and rejected tokens (no preference: no
    gradient, but a loss of log 2 and an accuracy of 0 in the means) are left out. A cut keeps labelled response
    tokens on both sides of every pair."""
    from conftest import TINY_MODEL_FLAGS
    from mateconv.data.shards import DPOTokens, shard_info

    pairs = DPOTokens(tiny_tokens / "dpo" / "train", 16)
    assert 0 < pairs.same < pairs.cut and len(pairs) + pairs.same == shard_info(pairs.directory)["num_records"]
    assert all(not pairs[i]["chosen_input_ids"].equal(pairs[i]["rejected_input_ids"]) for i in range(len(pairs)))
    assert all((pairs[i][f"{side}_labels"][1:] != -100).any() for i in range(len(pairs))
               for side in ("chosen", "rejected"))
    assert main("dpo", TINY_MODEL_FLAGS + [
        "--max_seq_len", "16", "--init_from", str(tiny_sft_model), "--data_path", str(tiny_tokens / "dpo" / "train"),
        "--val_data_path", "", "--forget_data_paths", "", "--out_dir", str(tmp_path), "--max_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert (f"[dpo] note: {pairs.cut} of {len(pairs) + pairs.same} training pairs are longer than max_seq_len 16: the "
            f"prompt is cut from its start (to half a row at least), then the responses at the row's end; {pairs.same} "
            "of them keep the same chosen and rejected tokens, no preference to learn: left out; raise max_seq_len to "
            "keep them whole") in out
    assert f", {len(pairs)} training examples -> " in out


def test_pairs_that_all_end_the_same_within_max_seq_len_are_refused(tiny_sft_model, tmp_path):
    from conftest import TINY_MODEL_FLAGS

    pairs = tmp_path / "pairs.jsonl"
    same_start = "The answer, after a long and careful thought about it, is "
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": same_start + "yes.",
                                         "rejected": same_start + "no."}) + "\n" for i in range(3)))
    with pytest.raises(SystemExit, match=r"^dpo: all 3 DPO training pairs have the same chosen and rejected tokens "
                                         r"within max_seq_len 16 \(they differ only further on\): raise max_seq_len$"):
        main("dpo", TINY_MODEL_FLAGS + [
            "--max_seq_len", "16", "--init_from", str(tiny_sft_model), "--pairs_path", str(pairs),
            "--val_data_path", "", "--forget_data_paths", "", "--out_dir", str(tmp_path / "dpo"), "--max_steps", "1",
            "--batch_size", "2"])
