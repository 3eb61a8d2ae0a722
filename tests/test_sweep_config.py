"""Sweep YAML parsing and validation, command macros."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mateconv.sweep.config import SweepError, load_sweep_config, parse_sweep_config
from mateconv.sweep.trials import build_command, trial_gpus
from mateconv.sweep.wandb_backend import choose_backend, run_wandb

REPO = Path(__file__).resolve().parents[1]


def _config(**overrides) -> dict:
    raw = {"program": "train.py", "method": "random", "metric": {"name": "val_loss", "goal": "minimize"},
           "parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
                          "use_moe": {"values": [True, False]}, "epochs": {"value": 1}}}
    raw.update(overrides)
    return raw


def test_shipped_sweep_configs_load():
    paths = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert paths
    for path in paths:
        program = load_sweep_config(path).program
        assert (REPO / program).is_file(), f"{path.name}: program {program} does not exist"


def test_parse_kinds_and_inference():
    config = parse_sweep_config(_config(parameters={
        "a": {"min": 1, "max": 8}, "b": {"min": 0.0, "max": 1}, "c": {"value": "x"}, "d": {"values": [1, 2]},
        "e": {"distribution": "log_uniform", "min": -9.2, "max": -4.6}}), default_name="s")
    kinds = {name: p.distribution for name, p in config.params.items()}
    assert kinds == {"a": "int_uniform", "b": "uniform", "c": "constant", "d": "categorical", "e": "log_uniform"}
    assert config.name == "s" and config.goal == "minimize" and config.metric == "val_loss"


@pytest.mark.parametrize("raw, message", [
    (_config(paramters={}), "unknown key 'paramters'; did you mean 'parameters'?"),
    ({k: v for k, v in _config().items() if k != "program"}, "missing 'program'"),
    (_config(method="bayesian"), "method must be one of grid, random, bayes"),
    (_config(metric={"name": "val_loss", "goal": "minimise"}), "goal must be minimize or maximize"),
    (_config(method="bayes", metric=None) | {"metric": {"nme": "x"}}, "metric must be a mapping with 'name'"),
    (_config(parameters={"lr": {"distrbution": "uniform", "min": 0, "max": 1}}),
     "parameter 'lr': unknown key 'distrbution'; did you mean 'distribution'?"),
    (_config(parameters={"lr": {"distribution": "log_uniform_value", "min": 1e-5, "max": 1e-2}}),
     "unknown distribution 'log_uniform_value'; did you mean 'log_uniform_values'?"),
    (_config(parameters={"lr": {"distribution": "log_uniform_values", "min": 0, "max": 1e-2}}), "min must be > 0"),
    (_config(parameters={"lr": {"min": 1e-2, "max": 1e-5}}), "must be smaller than max"),
    (_config(parameters={"lr": {"distribution": "uniform", "max": 1}}), "needs a numeric 'min'"),
    (_config(parameters={"lr": 3e-4}), "expected a mapping"),
    (_config(parameters={"lr": {"values": []}}), "non-empty list"),
    (_config(parameters={"lr": {"values": [1, 2], "probabilities": [1.0]}}),
     "'probabilities' must be a list of 2 non-negative numbers, one per value"),
    (_config(parameters={"lr": {"min": 1, "max": 2, "probabilities": [1.0]}}), "'probabilities' go with 'values'"),
    (_config(parameters={"opt": {"parameters": {"lr": {"value": 1}}}}), "nested parameters are not supported"),
    (_config(method="grid"), "method 'grid' needs 'values' or 'value'"),
    (_config(command=["${interpreter}", "${program}", "${argz}"]), "unknown command macro ${argz}"),
    (_config(run_cap=0), "sweep config: run_cap must be a positive integer, got 0"),
    (_config(metric={"name": "val_loss", "target": "low"}), "sweep config: metric target must be a number, got 'low'"),
])
def test_invalid_configs_name_the_problem(raw, message):
    with pytest.raises(SweepError) as error:
        parse_sweep_config(raw)
    assert message in str(error.value)


def test_bayes_needs_metric():
    raw = _config(method="bayes")
    del raw["metric"]
    with pytest.raises(SweepError, match="needs a metric"):
        parse_sweep_config(raw)


def test_file_errors(tmp_path):
    with pytest.raises(SweepError, match="not found"):
        load_sweep_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("program: [unclosed\n")
    with pytest.raises(SweepError, match=f"sweep config {bad}:2: not valid YAML: expected ','"):
        load_sweep_config(bad)


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """`min: 1e-5` (YAML 1.1 reads it as text) stopped with "needs a numeric 'min'"; a `values: [1e-3, 3e-4]`
    sweep's trials were strings."""
    path = tmp_path / "exponents.yaml"
    path.write_text("program: train.py\nmethod: random\nparameters:\n"
                    "  learning_rate: {distribution: log_uniform_values, min: 1e-5, max: 1E-2}\n"
                    "  weight_decay: {values: [1e-3, 3e-4, +2e1, 0.1]}\n  wandb_run_name: {value: 1e_5}\n")
    params = load_sweep_config(path).params
    assert (params["learning_rate"].low, params["learning_rate"].high) == (1e-5, 1e-2)
    assert params["weight_decay"].values == (1e-3, 3e-4, 20.0, 0.1) and params["wandb_run_name"].value == "1e_5"


def test_a_key_given_twice_names_its_line(tmp_path):
    """A second `parameters:` silently replaced the first (PyYAML keeps the last): half the search space was gone."""
    path = tmp_path / "twice.yaml"
    path.write_text("program: 4.pretrain.py\nmethod: random\nparameters:\n  lr: {values: [1.0e-3]}\n"
                    "parameters:\n  batch_size: {values: [4, 8]}\n")
    with pytest.raises(SweepError, match=f"^sweep config {path}:5: not valid YAML: key 'parameters' is given twice "
                                         "\\(first at line 3\\)$"):
        load_sweep_config(path)


def test_the_wandb_backend_without_a_login_is_one_line(tmp_path, monkeypatch):
    """`run_sweep.py --backend wandb` with no W&B API key ended in wandb's UsageError traceback, when it registered a
    sweep and when it joined one (`--sweep_id`)."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_config()))
    for key in [key for key in os.environ if key.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    reason = "No API key configured. Use `wandb login` to log in. (--backend optuna runs offline)"
    with pytest.raises(SweepError) as error:
        run_wandb(load_sweep_config(path), 1, tmp_path / "sweeps")
    assert str(error.value) == f"--backend wandb: W&B did not register the sweep: {reason}"
    with pytest.raises(SweepError) as error:
        run_wandb(load_sweep_config(path), 1, tmp_path / "sweeps", sweep_id="abc123")
    assert str(error.value) == f"--backend wandb: W&B did not run an agent of sweep abc123: {reason}"


def test_the_wandb_backend_in_offline_mode_says_so_at_once(tmp_path, monkeypatch):
    """`WANDB_MODE=offline run_sweep.py --backend wandb` said "No API key configured" without a key, and with one
    waited 26 s for W&B's server before a "service busy" error: offline, W&B cannot run a sweep."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_config()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for sweep_id in (None, "abc123"):
        with pytest.raises(SweepError, match="^--backend wandb: a W&B sweep needs W&B's server, and WANDB_MODE is "
                                             "offline: "):
            run_wandb(load_sweep_config(path), 1, tmp_path / "sweeps", sweep_id=sweep_id)


def test_a_sweep_id_joins_a_wandb_sweep(monkeypatch):
    """`run_sweep.py --sweep_id ID` offline ran a new local Optuna study instead of joining the W&B sweep."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert choose_backend("auto", "abc123") == "wandb" and choose_backend("auto", None) == "optuna"
    with pytest.raises(SweepError, match="^--sweep_id joins a W&B sweep: it goes with --backend wandb"):
        choose_backend("optuna", "abc123")


def test_cli_reports_a_typo_in_one_line(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(_config(metrc={"name": "loss"})))
    result = subprocess.run([sys.executable, str(REPO / "run_sweep.py"), "--config", str(path), "--count", "1",
                             "--backend", "optuna", "--out_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"run_sweep: {path}: sweep config: unknown key 'metrc'; did you mean 'metric'?"]


def test_command_macros(tmp_path):
    config = parse_sweep_config(_config(command=["${env}", "deepspeed", "--num_gpus", "2", "${program}",
                                                 "${args_no_boolean_flags}"]))
    command = build_command(config, {"lr": 0.001, "use_moe": True, "flash_attn": False}, tmp_path)
    assert command == ["deepspeed", "--num_gpus", "2", "train.py", "--lr", "0.001", "--use_moe",
                       "--out_dir", str(tmp_path)]
    default = build_command(parse_sweep_config(_config()), {"lr": 0.001}, tmp_path)
    assert default == [sys.executable, "train.py", "--lr", "0.001", "--out_dir", str(tmp_path)]


def test_a_launcher_given_num_gpus_and_gpus_to_use_is_refused():
    """`--gpus 2,3` with `command: [deepspeed, --num_gpus, "2", ...]` trained on GPUs 0 and 1: with --num_gpus the
    launcher drops CUDA_VISIBLE_DEVICES; without it, it spreads over the GPUs listed there."""
    launcher = parse_sweep_config(_config(command=["deepspeed", "--num_gpus=2", "${program}", "${args}"]))
    with pytest.raises(SweepError, match="command passes --num_gpus, .* not --gpus 2,3: leave --num_gpus out"):
        trial_gpus(launcher, "2,3")
    assert trial_gpus(launcher, None) == [None]
    spread = parse_sweep_config(_config(command=["deepspeed", "${program}", "${args}"]))
    assert trial_gpus(spread, "2,3") == ["2,3"]


def test_shipped_sweeps_render_flags_the_stages_accept():
    from mateconv.config import parse_config

    for path in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        config = load_sweep_config(path)
        for pick in (0, -1):  # first and last choice / bound of every parameter
            values = {name: p.value if p.distribution == "constant" else
                      p.values[pick] if p.values else (p.low, p.high)[pick] for name, p in config.params.items()}
            command = build_command(config, values, Path("/tmp/trial"))
            parsed = parse_config(command[2:])
            for name, value in values.items():
                assert parsed.get(name) == value, (path.name, name)


@pytest.mark.parametrize("args, expected", [
    (["--use_moe"], True), (["--use_moe", "false"], False),  # what the optuna backend passes (mateconv.flags)
    (["--use_moe=True"], True), (["--use_moe=False"], False),  # what W&B's CLI agent passes
    (["--use_moe", "true"], True), (["--use_moe", "1"], True),
])
def test_stage_parser_accepts_sweep_boolean_forms(args, expected):
    from mateconv.config import parse_config

    assert parse_config(args).model.use_moe is expected


def test_program_is_found_from_the_current_directory_or_the_repository(tmp_path, monkeypatch):
    """`program: 4.pretrain.py` run from another directory is this repository's stage (every trial failed with the
    program not found); a program found nowhere is one line at the start."""
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_config(program="4.pretrain.py")))
    monkeypatch.chdir(tmp_path)
    assert load_sweep_config(config).program == str(REPO / "4.pretrain.py")
    (tmp_path / "4.pretrain.py").write_text("")
    assert load_sweep_config(config).program == str(tmp_path / "4.pretrain.py")  # the current directory's first
    config.write_text(yaml.safe_dump(_config(program="my_train.py")))
    with pytest.raises(SweepError, match=rf"{config}: program my_train.py not found \(in {tmp_path} or {REPO}\)"):
        load_sweep_config(config)


@pytest.mark.parametrize("parameters, message", [
    ({"dpo_betta": {"values": [0.1, 0.2]}}, "parameter 'dpo_betta': unknown config key 'dpo_betta'; did you mean "
                                            "'dpo_beta'?"),
    ({"max_seq_len": {"value": "abc"}}, "parameter 'max_seq_len': max_seq_len: expected int, got 'abc'"),
    ({"use_wandb": {"values": [True, "maybe"]}}, "parameter 'use_wandb': use_wandb: 'maybe' is not one of True, False"),
    ({"preset": {"values": ["mateconv-0.02b", "tiny"]}},
     "parameter 'preset': preset: unknown model size 'tiny'; choose one of mateconv-0.02b, mateconv-0.1b, "
     "mateconv-0.1b-moe"),
])
def test_a_parameter_the_stage_does_not_take_is_named_before_any_trial(tmp_path, parameters, message):
    """Seed 000's `run_sweep.py --config sweep_config_dpo.yaml --count 5 --mode dpo` with a misspelt parameter, or a
    value its key does not take: every trial failed the same way, one after the other, and the sweep exited 0."""
    path = tmp_path / "sweep_config_dpo.yaml"
    path.write_text(yaml.safe_dump(_config(parameters={"learning_rate": {"values": [1e-6, 1e-5]}, **parameters})))
    with pytest.raises(SweepError) as error:
        load_sweep_config(path, str(REPO / "9.train_dpo.py"))
    assert str(error.value) == f"{path}: {message}"
    for one_program in ("pretrain_sft_lora.py", "train.py"):  # the seeds' one programs take the same flags
        with pytest.raises(SweepError) as error:
            load_sweep_config(path, str(REPO / one_program))
        assert str(error.value) == f"{path}: {message}"
    (tmp_path / "own.py").write_text("")  # a program of the user's own takes what it takes
    assert "learning_rate" in load_sweep_config(path, str(tmp_path / "own.py")).params


def test_an_out_dir_parameter_is_refused_not_dropped(tmp_path):
    """`out_dir: {value: out/lr_sweep}` among the parameters was replaced by each trial's own directory without a
    word, for a stage program and a program of the user's own alike."""
    path = tmp_path / "sweep.yaml"
    (tmp_path / "own.py").write_text("")
    path.write_text(yaml.safe_dump(_config(parameters={"out_dir": {"value": "out/lr_sweep"}})))
    for program in (str(REPO / "4.pretrain.py"), str(tmp_path / "own.py")):
        with pytest.raises(SweepError) as error:
            load_sweep_config(path, program)
        assert str(error.value) == (f"{path}: parameter 'out_dir': each trial writes <run_sweep.py --out_dir>/<sweep "
                                    "name>/trial_NNNN; give the directory as run_sweep.py --out_dir instead")


def test_a_stage_named_by_mode_or_by_the_yaml_is_one_search(tmp_path):
    """`run_sweep.py --mode dpo` names the stage by its full path: the stored study's digest held this clone's place,
    so the same sweep from a moved clone (or with `program: 9.train_dpo.py` in the YAML) was refused as changed."""
    from mateconv.sweep.optuna_backend import search_digest

    path = tmp_path / "sweep_config_dpo.yaml"
    path.write_text(yaml.safe_dump(_config(program="9.train_dpo.py",
                                           parameters={"learning_rate": {"values": [1e-6, 1e-5]}})))
    by_mode = load_sweep_config(path, str(REPO / "9.train_dpo.py"))
    assert search_digest(by_mode) == search_digest(load_sweep_config(path))
    assert search_digest(by_mode) != search_digest(load_sweep_config(path, str(REPO / "5.full_sft.py")))


def test_another_stage_by_mode_is_a_study_of_its_own(tmp_path):
    """`--mode pretrain` and then `--mode sft` with one YAML (the seeds' sweep_config.yaml) shared its study: the
    second was refused as a changed config, to be renamed or the first sweep deleted."""
    path = tmp_path / "sweep_config.yaml"
    path.write_text(yaml.safe_dump(_config(program="4.pretrain.py",
                                           parameters={"learning_rate": {"values": [1e-4, 1e-3]}})))
    assert load_sweep_config(path, str(REPO / "4.pretrain.py")).name == "sweep_config"
    assert load_sweep_config(path, str(REPO / "5.full_sft.py")).name == "sweep_config_sft"
    assert load_sweep_config(path, str(REPO / "9.train_dpo.py")).name == "sweep_config_dpo"
    path.write_text(yaml.safe_dump({key: value for key, value in yaml.safe_load(path.read_text()).items()
                                    if key != "program"}))  # the seeds' file names none: --mode does
    assert load_sweep_config(path, str(REPO / "5.full_sft.py")).name == "sweep_config"
