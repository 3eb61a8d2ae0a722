"""TrainConfig parsing (YAML, --overrides, flags, errors), DeepSpeed config filling, schedule, optimizers."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mateconv.config import (FLAGS, SECTIONS, TRAINER_ARGUMENTS, ConfigError, LoRAConfig, OptimConfig,
                             ParallelConfig, TrainConfig, help_text, parse_config, save_config)
from mateconv.train.ds_config import DS_CONFIG_DIR, auto_values, build_ds_config
from model import MateConvConfig
from mateconv.train.optim import Muon, build_optimizer, lr_multiplier, muon_parameters

REPO = Path(__file__).resolve().parents[1]


def test_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dim: 256\nlearning_rate: 1.0e-3\nuse_moe: false\nlora_target_modules: [q_proj, v_proj]\n")
    config = parse_config([str(path), "--overrides", "learning_rate=2e-5", "batch_size=32", "lr=3e-5",
                           "--dim", "128", "--use_moe"], defaults={"out_dir": "out/sft"})
    assert (config.model.dim, config.optim.learning_rate, config.optim.batch_size, config.model.use_moe) == (
        128, 3e-5, 32, True)
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.checkpoint.out_dir == "out/sft"


@pytest.mark.parametrize("argv", [
    ["--dim", "64", "first.yaml"], ["first.yaml", "--dim", "64"], ["--dim", "64", "--config", "first.yaml"],
    ["--overrides", "dim=64", "--config=first.yaml"], ["--overrides", "dim=64", "first.yaml"],
    ["--use_moe", "first.yaml", "second.yaml", "--dim", "64"], ["first.yaml", "--lora_target_modules", "q_proj",
                                                                "v_proj", "second.yaml", "--dim=64"],
])
def test_yaml_files_sit_under_every_flag_wherever_named(tmp_path, monkeypatch, argv):
    """Stage defaults < YAML files (in their order) < flags and overrides, whatever the files' place on the line; a
    file ends the values of the flag or --overrides before it."""
    monkeypatch.chdir(tmp_path)
    Path("first.yaml").write_text("dim: 128\nn_layers: 3\nlearning_rate: 1.0e-3\n")
    Path("second.yaml").write_text("dim: 256\nn_layers: 5\n")
    config = parse_config(argv, defaults={"n_layers": 1})
    assert (config.model.dim, config.optim.learning_rate) == (64, 1e-3)
    assert config.model.n_layers == (5 if "second.yaml" in argv else 3)
    assert config.model.use_moe is ("--use_moe" in argv)
    assert config.lora.target_modules == (["q_proj", "v_proj"] if "q_proj" in argv else LoRAConfig().target_modules)


def test_nested_yaml_and_dotted_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {dim: 256, use_moe: true}\noptim:\n  learning_rate: 1.0e-3\ndpo: {beta: 0.3}\n"
                    "batch_size: 4\n")
    config = parse_config([str(path), "--overrides", "model.n_layers=3", "dpo.loss_type=ipo"])
    assert (config.model.dim, config.model.use_moe, config.model.n_layers) == (256, True, 3)
    assert (config.optim.learning_rate, config.optim.batch_size) == (1e-3, 4)
    assert (config.dpo.beta, config.dpo.loss_type) == (0.3, "ipo")


def test_preset_sets_the_model_size_and_later_keys_win(tmp_path):
    from model.config import PRESETS

    config = parse_config(["--preset", "mateconv-0.1b-moe"])
    assert {key: getattr(config.model, key) for key in PRESETS["mateconv-0.1b-moe"]} == PRESETS["mateconv-0.1b-moe"]
    assert parse_config(["--preset", "mateconv-0.1b", "--dim", "256"]).model.dim == 256
    path = tmp_path / "c.yaml"
    path.write_text("n_layers: 3\npreset: mateconv-0.1b\n")  # the file's preset applies before its other keys
    assert (parse_config([str(path)]).model.dim, parse_config([str(path)]).model.n_layers) == (768, 3)
    with pytest.raises(ConfigError, match="preset: unknown model size 'mateconv-9b'; choose one of mateconv-0.02b"):
        parse_config(["--overrides", "preset=mateconv-9b"])


def test_initializer_range_and_tied_embeddings_are_settable():
    from mateconv.train.models import build_model

    config = parse_config(["--dim", "64", "--n_heads", "4", "--n_layers", "1", "--vocab_size", "64",
                           "--initializer_range", "0.5", "--tie_word_embeddings", "false"])
    model = build_model(config)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert 0.3 < model.lm_head.weight.std().item() < 0.7  # the default 0.02 would give ~0.02


def test_alias_map_covers_every_field_once():
    places = {(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if f.name in vars(cls).get("__annotations__", {})}
    assert set(FLAGS.values()) == places
    assert FLAGS["dim"] == ("model", "dim") and FLAGS["use_moe"] == ("model", "use_moe")
    assert FLAGS["dpo_beta"] == ("dpo", "beta") and FLAGS["ref_model_path"] == ("dpo", "ref_model_path")
    assert FLAGS["use_lora"] == ("lora", "enabled") and FLAGS["lora_r"] == ("lora", "r")
    for alias, place in {"lr": ("optim", "learning_rate"), "save_interval": ("checkpoint", "save_interval_steps"),
                         "ds_config_path": ("parallel", "ds_config"), "loss_type": ("dpo", "loss_type"),
                         "label_smoothing": ("dpo", "label_smoothing"), "kl_coef": ("dpo", "kl_coef"),
                         "sft_coef": ("dpo", "sft_coef")}.items():
        assert FLAGS[alias] == place
    config = parse_config(["--dpo_beta", "0.2", "--loss_type", "ipo", "--use_lora", "--lora_r", "4"])
    assert (config.dpo.beta, config.dpo.loss_type, config.lora.enabled, config.lora.r) == (0.2, "ipo", True, 4)
    assert config.get("dpo_beta") == 0.2 and config.get("lr") == config.optim.learning_rate


@pytest.mark.parametrize("stage, has_dpo", [("pretrain", False), ("sft", False), ("dpo", True)])
def test_stage_help_lists_only_the_sections_it_uses(stage, has_dpo):
    from mateconv.train.command import STAGE_DEFAULTS, STAGE_SECTIONS

    text = help_text(STAGE_SECTIONS[stage], STAGE_DEFAULTS[stage])
    assert ("--dpo_beta=" in text) is has_dpo and ("\ndpo:" in text) is has_dpo
    assert "--dim=512" in text and "--learning_rate=" in text and "--preset NAME" in text
    if stage == "sft":
        assert "--out_dir='out/sft'" in text  # the stage's own defaults


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_help_says_what_an_auto_default_picks(stage):
    """`--compile=None`, `--hidden_dim=None` and `--eval_at_start=None` meant "the run decides"; such a flag now shows
    auto with what it picks, and takes `auto` on the command line."""
    from mateconv.train.command import STAGE_DEFAULTS, STAGE_SECTIONS

    text = " ".join(help_text(STAGE_SECTIONS[stage], STAGE_DEFAULTS[stage]).split())
    assert "None" not in text and "'auto'" not in text
    assert "--compile=auto (on with CUDA and zero_stage 0-2, else off)" in text
    assert "--dtype=auto (bfloat16 on GPUs that have it, float16 on older ones, float32 on CPUs)" in text
    config = parse_config(["--hidden_dim", "auto", "--compile", "auto", "--eval_at_start", "auto", "--dim", "128"])
    assert (config.model.hidden_dim, config.parallel.compile, config.track.eval_at_start) == (384, None, None)


@pytest.mark.parametrize("flags, value", [(["--use_moe"], True), (["--use_moe", "1"], True),
                                          (["--use_moe", "true"], True), (["--use_moe=false"], False),
                                          (["--use_moe", "0"], False), (["--overrides", "use_moe=yes"], True)])
def test_boolean_forms(flags, value):
    assert parse_config(flags).model.use_moe is value


def test_a_bare_optional_switch_is_true():
    """Switches whose default None means "the stage decides" (`eval_at_start`, `compile`) are switches too."""
    config = parse_config(["--eval_at_start", "--compile", "--dim", "64"])
    assert (config.track.eval_at_start, config.parallel.compile, config.model.dim) == (True, True, 64)
    assert parse_config(["--eval_at_start", "none"]).track.eval_at_start is None
    # the chat's and the server's --compile take auto|1|0: the training's said "compile: expected bool, got 'auto'"
    assert parse_config(["--compile", "auto", "--eval_at_start", "auto"]).parallel.compile is None


def test_list_flags_take_several_values_or_commas():
    config = parse_config(["--lora_target_modules", "q_proj", "v_proj", "--forget_data_paths", "", "--use_moe"])
    assert (config.lora.target_modules, config.dpo.forget_data_paths) == (["q_proj", "v_proj"], [])
    assert parse_config(["--lora_target_modules", "q_proj,o_proj"]).lora.target_modules == ["q_proj", "o_proj"]
    # a YAML list in an override (seed 003's `--overrides key=value` form) was read as names "[q_proj" and "o_proj]"
    assert parse_config(["--overrides", "lora_target_modules=[q_proj, o_proj]"]).lora.target_modules == ["q_proj",
                                                                                                       "o_proj"]


def test_deepspeed_local_rank_and_optional_int():
    config = parse_config(["--local_rank=1", "--hidden_dim", "none", "--dim", "64"])
    assert config.parallel.local_rank == 1 and config.model.hidden_dim == 192  # derived from dim


@pytest.mark.parametrize("argv, message", [
    (["--learnin_rate", "1e-3"], "unknown config key 'learnin_rate'; did you mean 'learning_rate'?"),
    (["--overrides", "batchsize=4"], "unknown config key 'batchsize'; did you mean 'batch_size'?"),
    (["--batch_size", "four"], "batch_size: expected int, got 'four'"),
    (["--learning_rate", "fast"], "learning_rate: expected float, got 'fast'"),
    (["--learning_rate", "nan"], "learning_rate: expected a finite number, got 'nan'"),
    (["--overrides", "lr=inf"], "learning_rate: expected a finite number, got 'inf'"),
    (["--dpo_beta", "-inf"], "dpo_beta: expected a finite number, got '-inf'"),
    (["--min_lr_ratio", "2"], "min_lr_ratio must be in [0, 1], got 2.0"),
    (["--adam_beta2", "1.5"], "adam_beta2 must be in [0, 1), got 1.5"),
    (["--weight_decay", "-0.1"], "weight_decay must be >= 0, got -0.1"),
    (["--use_moe", "maybe"], "use_moe: expected bool, got 'maybe'"),
    (["--optimizer", "sgd"], "optimizer: 'sgd' is not one of adamw, muon"),
    (["--zero_stage", "4"], "zero_stage: 4 is not one of 0, 1, 2, 3"),
    (["--overrides", "batch_size"], "override 'batch_size' must look like key=value"),
    (["--dim"], "--dim needs a value"),
    (["--config"], "--config needs a value"),  # was: config file not found: .
    (["--config", "--dim", "64"], "--config needs a value"),
    (["missing.yaml"], "config file not found: missing.yaml"),
    (["--offload_param"], "offload_param needs zero_stage 3"),
    # engine torch ran plain DDP and left these out without a word (a run that needed ZeRO's memory ran out of it)
    (["--engine", "torch", "--zero_stage", "2"], "engine torch is plain PyTorch (one process or DDP): zero_stage, "
                                                 "ds_config and offload are DeepSpeed's settings (use --engine "
                                                 "deepspeed for them)"),
    (["--ddp", "--ds_config", "ds_configs/zero2.json"], "engine torch is plain PyTorch (one process or DDP): "
                                                        "zero_stage, ds_config and offload are DeepSpeed's settings "
                                                        "(use --engine deepspeed for them)"),
    (["--dim", "100", "--n_heads", "8"], "dim (100) must be divisible by n_heads (8)"),
    (["--dpo_beta", "0"], "dpo_beta must be > 0, got 0.0"),
    (["--overrides", "model.dimm=4"], "unknown config key 'model.dimm'; did you mean 'model.dim'?"),
    (["--max_grad_norm", "1"], "unknown config key 'max_grad_norm' (a Hugging Face Trainer argument); here it is "
                               "'grad_clip'"),
    (["--beta1", "0.9"], "unknown config key 'beta1'; Adam's betas here are 'adam_beta1' and 'adam_beta2'"),
    (["--beta2", "0.95"], "unknown config key 'beta2'; Adam's betas here are 'adam_beta1' and 'adam_beta2'"),
    (["--betas", "0.9,0.95"], "unknown config key 'betas'; Adam's betas here are 'adam_beta1' and 'adam_beta2'"),
    (["--overrides", "model.lr=1e-3"], "unknown config key 'model.lr'; lr belongs in section optim "
                                       "(optim.learning_rate)"),
    # each of these ran until a library refused it in a traceback (peft, numpy, torch's init, the hidden size)
    (["--use_lora", "--lora_r", "0"], "lora_r must be positive, got 0"),
    (["--lora_alpha", "-16"], "lora_alpha must be positive, got -16"),
    (["--lora_dropout", "1.5"], "lora_dropout must be in [0, 1), got 1.5"),
    (["--seed", "-1"], "seed must be in [0, 2**31), got -1"),
    (["--initializer_range", "-0.02"], "initializer_range must be >= 0, got -0.02"),
    (["--multiple_of", "0"], "MateConvConfig.multiple_of must be a positive integer, got 0"),
    # these trained on: a pad id outside the vocabulary, a negative balance loss or peak FLOP/s (a negative MFU)
    (["--pad_token_id", "-5"], "pad_token_id must be a token id in [0, vocab_size 6400), got -5"),
    (["--vocab_size", "512", "--eos_token_id", "512"], "eos_token_id must be a token id in [0, vocab_size 512), "
                                                       "got 512"),
    (["--aux_loss_alpha", "-0.1"], "aux_loss_alpha must be >= 0, got -0.1"),
    (["--peak_flops", "-1e12"], "peak_flops must be >= 0, got -1000000000000.0"),
])
def test_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_config(argv)
    assert str(error.value) == message


def test_yaml_values_are_type_checked_and_named_with_their_line(tmp_path):
    """A YAML key's error names the file and line (it named neither: which of the files, or a flag?)."""
    path = tmp_path / "bad.yaml"
    path.write_text("dim: 64\nbatch_size: 3.5\n")
    with pytest.raises(ConfigError, match=f"^{path}:2: batch_size: expected int, got 3.5$"):
        parse_config([str(path), "--batch_size", "4"])
    path.write_text("# the optimizer\noptim:\n  weight_decay: .nan\n")
    with pytest.raises(ConfigError, match=f"^{path}:3: weight_decay: expected a finite number, got nan$"):
        parse_config([str(path)])
    path.write_text("dim: 64\n1: 2\n")  # a key YAML reads as a number (a traceback before)
    with pytest.raises(ConfigError, match=f"^{path}:2: unknown config key '1'$"):
        parse_config([str(path)])


def test_a_yaml_key_given_twice_is_refused_with_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys: the first learning_rate of a long file was silently not used."""
    path = tmp_path / "twice.yaml"
    path.write_text("learning_rate: 1.0e-3\nbatch_size: 4\nlearning_rate: 3.0e-4\n")
    with pytest.raises(ConfigError, match=f"^{path}:3: not valid YAML: key 'learning_rate' is given twice \\(first "
                                          "at line 1\\)$"):
        parse_config([str(path)])
    path.write_text("model:\n  dim: 64\noptim:\n  lr: 1.0e-3\nmodel:\n  n_layers: 2\n")
    with pytest.raises(ConfigError, match=f"^{path}:5: not valid YAML: key 'model' is given twice"):
        parse_config([str(path)])
    path.write_text("lr: 1.0e-3\nbatch_size: 4\noptim:\n  learning_rate: 3.0e-4\n")  # one setting, two names
    with pytest.raises(ConfigError, match=f"^{path}:4: optim.learning_rate sets learning_rate again \\(first as lr "
                                          "at line 1\\)$"):
        parse_config([str(path)])
    from mateconv.files import load_yaml_mapping

    path.write_text("base: &base {dim: 64, n_layers: 2}\nmodel:\n  <<: *base\n  dim: 32\n")  # a merge's override
    assert load_yaml_mapping(path.read_text()) == {"base": {"dim": 64, "n_layers": 2}, "model": {"dim": 32,
                                                                                                  "n_layers": 2}}


@pytest.mark.parametrize("argv, resume", [(["--resume", "true"], "auto"), (["--resume", "yes"], "auto"),
                                          (["--resume"], "auto"), (["--resume", "1"], "auto"),
                                          (["--resume", "false"], "never"), (["--overrides", "resume=no"], "never"),
                                          (["--resume", ""], "auto"),  # was the path "": the current directory
                                          (["--resume", "out/sft/checkpoints/step_00000200"],
                                           "out/sft/checkpoints/step_00000200")])
def test_resume_takes_the_boolean_words(argv, resume):
    """`--resume true` was taken as the path of a checkpoint named true."""
    assert parse_config(argv).checkpoint.resume == resume


@pytest.mark.parametrize("value", ["None", "null", "NONE", ""])
def test_none_for_a_name_or_path_that_may_be_left_out_means_not_given(value):
    """Seed 000's flags table lists None as wandb_run_name's (and ref_model_path's) default: `--wandb_run_name None`
    named the W&B run "None" instead of letting W&B pick a name."""
    config = parse_config(["--wandb_run_name", value, "--wandb_project", value, "--ref_model_path", value])
    assert (config.track.wandb_run_name, config.track.wandb_project, config.dpo.ref_model_path) == ("", "", "")
    assert parse_config(["--init_from", "None"]).checkpoint.init_from == "None"  # "": from scratch, not the default


def test_a_yaml_resume_may_be_a_boolean(tmp_path):
    path = tmp_path / "resume.yaml"
    path.write_text("resume: false\n")  # was: resume: expected str, got False
    assert parse_config([str(path)]).checkpoint.resume == "never"


def test_help_names_the_program_the_user_ran(capsys):
    """`pretrain_sft_lora.py --mode sft --help` printed `usage: sft ...`, a program that does not exist."""
    from mateconv.train.command import main, main_one_program

    main_one_program("pretrain_sft_lora", ["--mode", "sft", "--help"])
    assert capsys.readouterr().out.startswith("usage: pretrain_sft_lora.py --mode sft [CONFIG.yaml] [--key value")
    main("dpo", ["--help"])
    assert capsys.readouterr().out.startswith("usage: 9.train_dpo.py [CONFIG.yaml] [--key value")


def test_the_seed_program_pretrains_without_a_mode(capsys):
    """Seed 000's flags table gives `--mode` the default pretrain; `pretrain_sft_lora.py --epochs 1` was refused."""
    from mateconv.train.command import main_one_program

    with pytest.raises(SystemExit) as stopped:
        main_one_program("pretrain_sft_lora", ["--epochs", "1", "--dim", "100", "--n_heads", "8"])
    assert str(stopped.value) == "pretrain: dim (100) must be divisible by n_heads (8)"
    assert capsys.readouterr().out == "[pretrain_sft_lora] no --mode: pretrain (seed 000's default)\n"


def test_a_yaml_syntax_error_names_its_line_and_problem(tmp_path):
    """PyYAML's first message line ('while scanning for the next token') named neither the line nor the problem."""
    path = tmp_path / "bad.yaml"
    path.write_text("dim: 64\n\tn_layers: 2\n")
    with pytest.raises(ConfigError, match=f"^{path}:2: not valid YAML: found character '\\\\t' that cannot start"):
        parse_config([str(path)])


def test_a_yaml_key_in_another_section_names_its_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {dim: 64}\n")
    with pytest.raises(ConfigError) as error:
        parse_config([str(path)])
    assert str(error.value) == f"{path}:1: unknown config key 'optim.dim'; dim belongs in section model (model.dim)"
    path.write_text("optim: {dropout: 0.1}\n")
    with pytest.raises(ConfigError, match=r"dropout belongs in section model \(model.dropout\) or section lora "
                                          r"\(lora.dropout\)$"):
        parse_config([str(path)])


@pytest.mark.parametrize("argv", [
    ["--dim", "96", "--use_moe", "--lora_target_modules", "q_proj,o_proj", "--batch_size", "4", "--eval_batches", "5",
     "--compile", "0", "--learning_rate", "3e-4", "--init_from", ""],  # from scratch: the model flags are saved
    ["--total_batch_size", "16", "--accumulation_steps", "2", "--eval_examples", "64"],
])
def test_saved_config_reruns_the_run(tmp_path, argv):
    """A checkpoint's config.yaml (save_config after per_rank_sizes, as a run writes it) parses back, under the stage's
    defaults, to the run's config field for field: `batch_size: 4` is not lost to the `total_batch_size: 0` saved after
    it (nor `eval_batches: 5` to `eval_examples: 0`)."""
    from mateconv.config import per_rank_sizes
    from mateconv.train.stages import RECIPES

    defaults = RECIPES["sft"].defaults
    config = parse_config(argv, defaults)
    per_rank_sizes(config, world_size=2)
    save_config(config, tmp_path / "config.yaml")
    again = parse_config([str(tmp_path / "config.yaml")], defaults)
    per_rank_sizes(again, world_size=2)
    assert again == config
    assert (again.optim.batch_size, again.track.eval_rows(again.optim.batch_size)) == (
        (4, 20) if "--batch_size" in argv else (4, 64))


def test_shipped_yaml_configs_parse():
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {"pretrain_tiny.yaml", "sft_tiny.yaml", "mateconv_0.02b.yaml", "mateconv_moe.yaml"} <= names
    for name in names:
        parse_config([str(REPO / "configs" / name)])


def program_run(program: str, flags: list[str]) -> tuple[str, set[str]]:
    """A program's output, stdout then stderr, without the modules `python -X importtime` lists; and those modules
    (its lines end `| package.module`)."""
    result = subprocess.run([sys.executable, "-X", "importtime", program, *flags], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    imports = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    said = result.stdout + "".join(f"{line}\n" for line in result.stderr.splitlines() if line not in imports)
    return said, {line.rsplit("|", 1)[1].strip() for line in imports}


@pytest.mark.parametrize("program, flags, said", [
    ("4.pretrain.py", ["--n_layer", "4"], "pretrain: unknown config key 'n_layer'; did you mean 'n_layers'?\n"),
    ("pretrain_sft_lora.py", ["--mode", "sft", "--lr", "x"], "sft: learning_rate: expected float, got 'x'\n"),
    ("9.train_dpo.py", ["--help"], "usage: 9.train_dpo.py [CONFIG.yaml]")])
def test_a_flag_typo_or_help_is_answered_in_one_line_before_the_trainer_loads(program, flags, said):
    """`4.pretrain.py --lerning_rate 1` imported the whole trainer (mateconv.train.stages) before saying its line."""
    output, modules = program_run(program, flags)
    assert output == said if said.endswith("\n") else output.startswith(said), output
    assert not {"deepspeed", "mateconv.train.engine", "mateconv.train.stages"} & modules


@pytest.mark.parametrize("stage, offload", [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)])
def test_ds_configs_fill_every_auto(stage, offload):
    config = TrainConfig(parallel=ParallelConfig(zero_stage=stage, offload_optimizer=offload,
                                                 offload_param=offload and stage == 3),
                         optim=OptimConfig(batch_size=6, accumulation_steps=4, grad_clip=0.5))
    ds = build_ds_config(config, torch.bfloat16, world_size=2, hidden=512)
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (6, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    assert ds.get("optimizer", {}).get("type") == ("AdamW" if offload else None)


def test_ds_config_files_are_valid_json():
    assert sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")) == [
        "zero0.json", "zero1.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]
    ds = build_ds_config(parse_config(["--zero_stage", "1", "--optimizer", "muon"]), torch.float16, 1, 64)
    assert ds["optimizer"]["type"] == "Muon" and ds["fp16"]["enabled"]
    zero0 = build_ds_config(parse_config(["--zero_stage", "0", "--optimizer", "muon"]), torch.float32, 1, 64)
    assert "optimizer" not in zero0  # ZeRO-0: our own Muon, so the engine measures its grad norm


USER_DS_CONFIG = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 4,
                  "gradient_clipping": 0.5, "zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("key, value, flag", [
    ("train_micro_batch_size_per_gpu", 16, "--batch_size 4"),
    ("gradient_accumulation_steps", 4, "--accumulation_steps 1"),
    ("train_batch_size", 64, "--batch_size 4 x --accumulation_steps 1 x 2 rank(s)"),
    ("gradient_clipping", 0.5, "--grad_clip 1.0"),
    ("zero_optimization.stage", 2, "--zero_stage 1"),
    ("bf16.enabled", True, "--dtype float32")])
def test_a_user_ds_config_that_disagrees_with_the_flags_is_one_line(tmp_path, key, value, flag):
    """A fixed value of the file was used silently: DeepSpeed accumulated 4 micro-batches per update while MateConv
    counted each as a step (every step 'not finite, optimizer step skipped'), or ran another ZeRO stage than logged."""
    path = tmp_path / "ds.json"
    *sections, last = key.split(".")
    node = ds = {}
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = value
    path.write_text(json.dumps(ds))
    config = parse_config(["--ds_config", str(path), "--batch_size", "4", "--zero_stage", "1"])
    with pytest.raises(ConfigError) as error:
        build_ds_config(config, torch.float32, world_size=2, hidden=64)
    assert str(error.value) == (f"--ds_config {path}: {key} is {json.dumps(value)} there but {flag} here: set it to "
                                f"\"auto\" (or {json.dumps(auto_values(config, torch.float32, 2, 64)[key])}), or "
                                "change the flag")


def test_a_user_ds_config_that_agrees_is_completed_from_the_flags(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(USER_DS_CONFIG))
    config = parse_config(["--ds_config", str(path), "--batch_size", "16", "--accumulation_steps", "4",
                           "--grad_clip", "0.5", "--zero_stage", "1"])
    ds = build_ds_config(config, torch.bfloat16, world_size=1, hidden=64)
    assert ds == {**USER_DS_CONFIG, "bf16": {"enabled": True}, "fp16": {"enabled": False}}
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))  # the rest left out
    ds = build_ds_config(parse_config(["--ds_config", str(path), "--batch_size", "4"]), torch.float32, 2, 64)
    sizes = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    assert tuple(ds[key] for key in sizes) == (4, 1, 8)
    assert ds["zero_optimization"] == {"reduce_bucket_size": 1000, "stage": 0} and ds["gradient_clipping"] == 1.0


@pytest.mark.parametrize("section, flags", [("optimizer", "--optimizer, --learning_rate"),
                                            ("scheduler", "--warmup_iters or --warmup_ratio")])
def test_a_user_ds_config_may_not_bring_its_own_optimizer_or_schedule(tmp_path, section, flags):
    """The file's optimizer lr was used under MateConv's schedule and its WarmupLR ignored, while config.yaml
    recorded the flags."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({section: {"type": "AdamW", "params": {"lr": 0.1}}}))
    with pytest.raises(ConfigError, match=rf"^--ds_config {path}: remove its \"{section}\" section: MateConv builds "
                                          rf"the {section} from {flags}"):
        build_ds_config(parse_config(["--ds_config", str(path)]), torch.float32, 1, 64)


def test_a_user_ds_config_offloads_only_with_the_offload_flags(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="zero_optimization.offload_optimizer is set there but --offload_optimizer "
                                          "is false here"):
        build_ds_config(parse_config(["--ds_config", str(path), "--zero_stage", "2"]), torch.float32, 1, 64)
    ds = build_ds_config(parse_config(["--ds_config", str(path), "--zero_stage", "2", "--offload_optimizer"]),
                         torch.float32, 1, 64)
    assert ds["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPUAdam, from the flags


def test_warmup_then_cosine():
    values = [lr_multiplier(step, warmup=10, total=110, min_ratio=0.1) for step in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55) and values[110] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


def test_muon_gets_hidden_matrices_only():
    from model import MateConvForCausalLM

    model = MateConvForCausalLM(MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                                               use_moe=True))
    chosen = {name for name, p in model.named_parameters() if id(p) in muon_parameters(model)}
    assert "model.layers.0.self_attn.q_proj.weight" in chosen
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in chosen
    assert not any("embed" in n or "norm" in n or n.endswith("mlp.gate.weight") for n in chosen)
    optimizer = build_optimizer(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    muon_part = optimizer.optimizers[0]
    assert isinstance(muon_part, Muon) and muon_part.ns_dtype == torch.float32
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_muon_over_lora_adapters_alone_steps():
    """LoRA's trainable weights are all hidden matrices: Muon takes them and no AdamW part is built (torch's AdamW
    refuses an empty parameter list, which was a traceback for `5.full_sft.py --use_lora --optimizer muon`)."""
    from mateconv.train.models import add_lora
    from model import MateConvForCausalLM

    model = add_lora(MateConvForCausalLM(MateConvConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                                        vocab_size=128)), LoRAConfig(enabled=True))
    optimizer = build_optimizer(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [type(part) for part in optimizer.optimizers] == [Muon]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    model(torch.randint(0, 128, (1, 8)), labels=torch.randint(0, 128, (1, 8))).loss.backward()
    before = [p.detach().clone() for p in trainable]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))


def test_fp32_muon_step_matches_torch_muon():
    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    grads = [torch.randn(48, 32) for _ in range(3)]
    results = []
    for optimizer_class, kwargs in ((torch.optim.Muon, {}), (Muon, {"ns_dtype": torch.float32})):
        param = torch.nn.Parameter(weight.clone())
        optimizer = optimizer_class([param], lr=0.02, weight_decay=0.1, **kwargs)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach())
    torch_bf16, ours_fp32 = results
    assert not torch.equal(ours_fp32, weight)
    # torch orthogonalises in bf16: same update up to bf16 rounding (~1e-2 relative on a 0.02-sized step)
    assert torch.allclose(ours_fp32, torch_bf16, atol=2e-3)


def test_warmup_ratio_overrides_warmup_iters():
    from mateconv.train.optim import warmup_steps

    assert warmup_steps(OptimConfig(warmup_iters=7), 200) == 7
    assert warmup_steps(OptimConfig(warmup_iters=7, warmup_ratio=0.1), 200) == 20
    with pytest.raises(ConfigError, match="warmup_ratio must be in"):
        parse_config(["--warmup_ratio", "1.5"])


def test_trainer_argument_hints_name_our_flags():
    for theirs, ours in TRAINER_ARGUMENTS.items():
        assert ours in FLAGS and theirs not in FLAGS, theirs


# Seed 003's example config (its README), every key; `python train.py config.yml` reads it.
SEED_003_CONFIG = """\
seed: 0
exp_name: my_experiment
datasets:
  - type: custom_dataset
    path: path/to/your/dataset.json
trainer: BasicTrainer
optimizer: AdamW
lr: 1e-5
total_batch_size: 16
gradient_accumulation_steps: 4
max_length: 512
n_epochs: 100
model:
  name_or_path: your/model/path
  policy_dtype: float16
  archive: null
loss:
  name: dpo
  beta: 0.1
activation_checkpointing: true
wandb:
  enabled: true
  entity: your_entity
  project: "Minimal-LLM-Alignment"
report_to_tensorboard: false
do_first_eval: false
eval_every_steps: 100
n_eval_examples: 256
"""


def test_seed_003_config_keys(tmp_path):
    from mateconv.config import per_rank_sizes

    path = tmp_path / "config.yml"
    path.write_text(SEED_003_CONFIG)
    config = parse_config([str(path)], {}, "dpo")
    assert (config.data.data_path, config.parallel.engine, config.optim.optimizer, config.optim.learning_rate,
            config.optim.total_batch_size, config.optim.accumulation_steps, config.model.max_seq_len,
            config.optim.epochs, config.optim.seed, config.checkpoint.init_from, config.parallel.dtype,
            config.dpo.loss_type, config.dpo.beta, config.parallel.gradient_checkpointing, config.track.tracker,
            config.track.wandb_entity, config.track.wandb_project, config.track.wandb_run_name,
            config.track.eval_at_start, config.track.eval_interval, config.track.eval_examples) == (
        "path/to/your/dataset.json", "auto", "adamw", 1e-5, 16, 4, 512, 100, 0, "your/model/path", "float16",
        "sigmoid", 0.1, True, "wandb", "your_entity", "Minimal-LLM-Alignment", "my_experiment", False, 100, 256)
    per_rank_sizes(config, world_size=2)  # 16 examples a step = 2 ranks x 4 micro-batches x 2
    assert (config.optim.batch_size, config.track.eval_rows(config.optim.batch_size)) == (2, 256)
    # the seed's override line: batch_size after total_batch_size wins (and the other way round); ipo is DPO's stage
    config = parse_config([str(path), "--overrides", "lr=2e-5", "batch_size=32", "loss.name=ipo"], {}, "dpo")
    per_rank_sizes(config, world_size=2)
    assert (config.optim.learning_rate, config.optim.batch_size, config.optim.total_batch_size,
            config.dpo.loss_type) == (2e-5, 32, 0, "ipo")
    # debug mode: no W&B; debug false leaves the tracker the config chose
    assert parse_config([str(path), "--overrides", "debug=true"], {}, "dpo").track.tracker == "none"
    assert parse_config([str(path), "--overrides", "debug=false"], {}, "dpo").track.tracker == "wandb"
    assert parse_config(["--batch_size", "32", "--total_batch_size", "8"], {}).optim.batch_size == 32
    assert parse_config(["--batch_size", "32", "--total_batch_size", "8"], {}).optim.total_batch_size == 8
    # a run's weights (archive) win over name_or_path whatever their order; report_to_tensorboard picks tensorboard
    path.write_text(SEED_003_CONFIG.replace("  archive: null\n", "").replace(
        "model:\n", "model:\n  archive: out/sft/final\n").replace("report_to_tensorboard: false",
                                                                  "report_to_tensorboard: true"))
    config = parse_config([str(path)], {}, "dpo")
    assert (config.checkpoint.init_from, config.track.tracker) == ("out/sft/final", "tensorboard")


@pytest.mark.parametrize("argv, stage, message", [
    (["--overrides", "loss.name=sft"], "dpo", "loss.name: 'sft' is not this program's stage (dpo); 5.full_sft.py "
                                              "trains sft"),
    (["--total_batch_size", "12", "--accumulation_steps", "8"], "sft",
     "total_batch_size 12 is not a multiple of accumulation_steps 8 x 1 rank(s)"),
    (["--optimizer", "RMSprop"], "sft", "optimizer: 'rmsprop' is not one of adamw, muon"),
])
def test_seed_003_errors(argv, stage, message):
    from mateconv.config import per_rank_sizes

    with pytest.raises(ConfigError) as error:
        per_rank_sizes(parse_config(argv, {}, stage), world_size=1)
    assert str(error.value) == message


def test_seed_003_an_override_of_loss_name_picks_the_stage(tmp_path):
    """`python train.py sft.yml --overrides loss.name=ipo` runs DPO (IPO) with the config's other keys: the override
    wins, as any later key does (it was refused: the config's 'sft' was not the stage train.py had picked from it)."""
    path = tmp_path / "sft.yml"
    path.write_text("loss:\n  name: sft\n  beta: 0.2\n")
    config = parse_config([str(path), "--overrides", "loss.name=ipo"], {}, "dpo")
    assert (config.dpo.loss_type, config.dpo.beta) == ("ipo", 0.2)
    with pytest.raises(ConfigError, match=r"^loss.name: 'ipo' is not this program's stage \(sft\); 9.train_dpo.py "
                                          r"trains dpo$"):
        parse_config([str(path), "--overrides", "loss.name=ipo"], {}, "sft")


def test_seed_003_datasets_take_one_file(tmp_path):
    assert parse_config(["--overrides", "datasets=a.json"], {}, "sft").data.data_path == "a.json"
    path = tmp_path / "config.yml"
    path.write_text("datasets:\n  - a.json\n  - {type: custom_dataset, path: b.json}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: datasets: one data file per run here, got 2 \(merge them"):
        parse_config([str(path)], {}, "sft")
    path.write_text("datasets:\n  - {type: hh}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: datasets: an entry needs the path of a local JSON/JSONL file"):
        parse_config([str(path)], {}, "sft")


def test_model_flags_must_match_the_init_from_model(tmp_path):
    """With init_from the saved model trains as it is: a model flag given (command line or YAML) with another value
    is an error naming each clash; equal values, the flags a run still uses (max_seq_len, flash_attn; for a MateConv
    model the settings only training reads, for another model dropout, not given the saved model's) and the stage
    defaults pass."""
    saved = MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, dropout=0.2)
    saved.save_pretrained(tmp_path / "start")
    start = ["--init_from", str(tmp_path / "start")]
    config = parse_config([*start, "--dim", "64", "--n_layers", "2", "--max_seq_len", "64", "--flash_attn", "0"],
                          {"dim": 512, "use_moe": True, "dropout": 0.0})
    assert config.model.max_seq_len == 64 and not config.model.flash_attn and config.model.dropout == 0.2
    config = parse_config([*start, "--dropout", "0.1", "--aux_loss_alpha", "0.01", "--seq_aux", "0"])
    assert (config.model.dropout, config.model.aux_loss_alpha, config.model.seq_aux) == (0.1, 0.01, False)
    (tmp_path / "opt").mkdir()  # a Hugging Face model: --dropout sets its dropout probabilities (not given: its own)
    (tmp_path / "opt" / "config.json").write_text('{"model_type": "opt", "dropout": 0.1, "attention_dropout": 0.0}')
    assert parse_config(["--init_from", str(tmp_path / "opt"), "--dropout", "0.2"]).model.dropout == 0.2
    assert parse_config(["--init_from", str(tmp_path / "opt")]).model.dropout == 0.1
    (tmp_path / "opt" / "config.json").write_text('{"model_type": "mamba"}')  # one without any: refused
    with pytest.raises(ConfigError, match=r"^dropout: init_from .*opt \(mamba\) has no dropout setting in its "
                                          r"config.json to set; drop --dropout$"):
        parse_config(["--init_from", str(tmp_path / "opt"), "--dropout", "0.1"])
    with pytest.raises(ConfigError, match=r"^init_from .*start is the model this run trains, as it is: "
                                          r"dim 512 \(it has 64\), use_moe True \(it has False\); drop those model"):
        parse_config([*start, "--dim", "512", "--n_layers", "2", "--use_moe"])
    (tmp_path / "sft.yaml").write_text("model: {n_layers: 8}\n")
    with pytest.raises(ConfigError, match=r"n_layers 8 \(it has 2\)"):
        parse_config([str(tmp_path / "sft.yaml"), *start])
    with pytest.raises(ConfigError, match=r"n_heads 8 \(it has 4\)"):  # a preset names a model size too
        parse_config([*start, "--preset", "mateconv-0.02b"])
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000010"  # a training checkpoint: its config.yaml's model
    checkpoint.mkdir(parents=True)
    save_config(parse_config(["--dim", "64", "--n_layers", "2", "--max_seq_len", "96"]), checkpoint / "config.yaml")
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"dim 128 \(it has 64\)"):
        parse_config(["--init_from", str(checkpoint), "--dim", "128"])
    assert parse_config(["--init_from", str(checkpoint)]).model.max_seq_len == 96
