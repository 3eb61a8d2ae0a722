"""A sweep's YAML file in W&B's sweep schema: read, checked key by key, and its parameters checked against the
program's config keys before any trial runs."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from mateconv.config import STAGE_PROGRAMS, ConfigError, check_key, resolve
from mateconv.files import UniqueKeyLoader, yaml_error


REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL_KEYS = ("program", "method", "metric", "parameters", "name", "description", "command", "early_terminate",
                  "project", "entity", "run_cap")
METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
PARAMETER_KEYS = ("value", "values", "distribution", "min", "max", "q", "mu", "sigma", "a", "b", "probabilities",
                  "parameters")
# Distributions the Optuna backend maps; W&B also knows the ones below, which only `--backend wandb` runs.
OPTUNA_DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "q_uniform", "log_uniform",
                        "log_uniform_values", "q_log_uniform_values")
WANDB_ONLY_DISTRIBUTIONS = ("q_log_uniform", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal",
                            "log_normal", "q_log_normal", "beta", "q_beta")
EARLY_TERMINATE_KEYS = ("type", "min_iter", "max_iter", "s", "eta", "strict")
COMMAND_MACROS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}",
                  "${args_no_boolean_flags}", "${args_json}")


class SweepError(ValueError):
    """A sweep config or a trial that cannot be used; the message names the problem."""


class SweepInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the sweep (what it kept is said and written): the program exits 128 + the signal,
    as a shell reports a program a signal ended, so that `run_sweep.py && next` does not go on."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class SweepLoader(UniqueKeyLoader):
    """YAML 1.1 reads a number in exponent form without a dot (`min: 1e-5`, as sweep configs write learning rates) as
    text; here it is a number, as YAML 1.2 and W&B's examples have it."""


SweepLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


@dataclass(frozen=True)
class Param:
    name: str
    distribution: str  # one of OPTUNA_DISTRIBUTIONS or WANDB_ONLY_DISTRIBUTIONS
    value: Any = None
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    q: float | None = None
    probabilities: tuple = ()  # W&B's weights of `values`


@dataclass(frozen=True)
class SweepConfig:
    name: str
    program: str
    method: str
    metric: str | None
    goal: str
    params: dict[str, Param]
    command: tuple[str, ...] | None
    early_terminate: dict | None  # W&B's hyperband keys, checked
    raw: dict  # the YAML as read, handed to wandb.sweep unchanged


def _check_keys(where: str, given: dict, allowed: tuple[str, ...]) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(allowed)})"
            raise SweepError(f"{where}: unknown key '{key}'{hint}")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_param(name: str, spec: Any) -> Param:
    where = f"parameter '{name}'"
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping such as {{values: [...]}} or {{min: .., max: ..}}, got {spec!r}")
    _check_keys(where, spec, PARAMETER_KEYS)
    if "parameters" in spec:
        raise SweepError(f"{where}: nested parameters are not supported; the program takes flat --key value flags")
    distribution = spec.get("distribution")
    if "value" in spec and distribution in (None, "constant"):
        return Param(name, "constant", value=spec["value"])
    if "values" in spec and distribution in (None, "categorical"):
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: 'values' must be a non-empty list")
        for v in values:
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise SweepError(f"{where}: values must be numbers, strings, booleans or null, got {v!r}")
        probabilities = spec.get("probabilities", [])
        if not (isinstance(probabilities, list) and len(probabilities) in (0, len(values))
                and all(is_number(p) and p >= 0 for p in probabilities)):
            raise SweepError(f"{where}: 'probabilities' must be a list of {len(values)} non-negative numbers, "
                             "one per value")
        return Param(name, "categorical", values=tuple(values), probabilities=tuple(probabilities))
    if "probabilities" in spec:
        raise SweepError(f"{where}: 'probabilities' go with 'values' (the weight of each)")
    if distribution is None:
        if "min" not in spec or "max" not in spec:
            raise SweepError(f"{where}: give 'value', 'values', or 'min' and 'max' (with an optional 'distribution')")
        # W&B's inference: integer bounds sample integers, anything else floats.
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        distribution = "int_uniform" if both_int else "uniform"
    if distribution in WANDB_ONLY_DISTRIBUTIONS:
        return Param(name, distribution)
    if distribution not in OPTUNA_DISTRIBUTIONS:
        close = difflib.get_close_matches(str(distribution), OPTUNA_DISTRIBUTIONS + WANDB_ONLY_DISTRIBUTIONS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SweepError(f"{where}: unknown distribution '{distribution}'{hint}")
    if distribution in ("constant", "categorical"):
        needed = "value" if distribution == "constant" else "values"
        raise SweepError(f"{where}: distribution '{distribution}' needs '{needed}'")
    for key in ("min", "max"):
        if not is_number(spec.get(key)):
            raise SweepError(f"{where}: distribution '{distribution}' needs a numeric '{key}'")
    low, high = spec["min"], spec["max"]
    if not low < high:
        raise SweepError(f"{where}: min ({low}) must be smaller than max ({high})")
    if distribution in ("log_uniform_values", "q_log_uniform_values") and low <= 0:
        raise SweepError(f"{where}: {distribution} takes values, so min must be > 0 (got {low}); "
                         "for natural-log exponents use 'log_uniform'")
    if distribution == "int_uniform" and not all(isinstance(x, int) for x in (low, high)):
        raise SweepError(f"{where}: int_uniform needs integer min and max")
    q = spec.get("q", 1)
    if distribution.startswith("q_") and not (is_number(q) and q > 0):
        raise SweepError(f"{where}: q must be a positive number")
    return Param(name, distribution, low=low, high=high, q=q if distribution.startswith("q_") else None)


def parse_early_terminate(spec: Any) -> dict:
    """W&B's `early_terminate` (hyperband, the only type W&B knows), checked as W&B's schema checks it."""
    where = "sweep config early_terminate"
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping such as {{type: hyperband, min_iter: 3}}, got {spec!r}")
    _check_keys(where, spec, EARLY_TERMINATE_KEYS)
    if spec.get("type") != "hyperband":
        raise SweepError(f"{where}: type must be hyperband, got {spec.get('type')!r}")
    for key in ("min_iter", "max_iter", "s"):
        if key in spec and not (isinstance(spec[key], int) and not isinstance(spec[key], bool) and spec[key] >= 1):
            raise SweepError(f"{where}: {key} must be a positive integer, got {spec[key]!r}")
    if "eta" in spec and not (is_number(spec["eta"]) and spec["eta"] > 1):
        raise SweepError(f"{where}: eta must be a number above 1, got {spec['eta']!r}")
    if "min_iter" not in spec and not ("max_iter" in spec and "s" in spec):
        raise SweepError(f"{where}: give min_iter, or max_iter and s")
    return spec


def parse_sweep_config(raw: Any, default_name: str = "sweep") -> SweepConfig:
    if not isinstance(raw, dict):
        raise SweepError("sweep config: expected a mapping at the top level")
    _check_keys("sweep config", raw, TOP_LEVEL_KEYS)
    for key in ("program", "method", "parameters"):
        if key not in raw:
            raise SweepError(f"sweep config: missing '{key}'")
    if raw["method"] not in METHODS:
        raise SweepError(f"sweep config: method must be one of {', '.join(METHODS)}, got {raw['method']!r}")
    metric, goal = None, "minimize"
    if "metric" in raw:
        if not isinstance(raw["metric"], dict) or "name" not in raw["metric"]:
            raise SweepError("sweep config: metric must be a mapping with 'name' (and 'goal')")
        _check_keys("sweep config metric", raw["metric"], ("name", "goal", "target"))
        metric, goal = str(raw["metric"]["name"]), raw["metric"].get("goal", "minimize")
        if goal not in GOALS:
            raise SweepError(f"sweep config: metric goal must be minimize or maximize, got {goal!r}")
        if "target" in raw["metric"] and not is_number(raw["metric"]["target"]):
            raise SweepError(f"sweep config: metric target must be a number, got {raw['metric']['target']!r}")
    elif raw["method"] == "bayes":
        raise SweepError("sweep config: method 'bayes' needs a metric {name, goal}")
    if not isinstance(raw["parameters"], dict) or not raw["parameters"]:
        raise SweepError("sweep config: 'parameters' must be a non-empty mapping")
    params = {str(k): parse_param(str(k), v) for k, v in raw["parameters"].items()}
    if "out_dir" in params:  # `build_command` gives each trial its own: a value here was dropped without a word
        raise SweepError("parameter 'out_dir': each trial writes <run_sweep.py --out_dir>/<sweep name>/trial_NNNN; "
                         "give the directory as run_sweep.py --out_dir instead")
    if raw["method"] == "grid":
        for p in params.values():
            if p.distribution not in ("constant", "categorical"):
                raise SweepError(f"parameter '{p.name}': method 'grid' needs 'values' or 'value', not a distribution")
    run_cap = raw.get("run_cap")
    if run_cap is not None and not (isinstance(run_cap, int) and not isinstance(run_cap, bool) and run_cap >= 1):
        raise SweepError(f"sweep config: run_cap must be a positive integer, got {run_cap!r}")
    command = raw.get("command")
    if command is not None:
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise SweepError("sweep config: command must be a list of strings")
        for token in command:
            if token.startswith("${") and token not in COMMAND_MACROS:
                raise SweepError(f"sweep config: unknown command macro {token} (known: {', '.join(COMMAND_MACROS)})")
        command = tuple(command)
    early_terminate = raw.get("early_terminate")
    if early_terminate is not None:
        if metric is None:
            raise SweepError("sweep config: early_terminate needs a metric {name, goal}")
        early_terminate = parse_early_terminate(early_terminate)
    return SweepConfig(name=str(raw.get("name", default_name)), program=str(raw["program"]), method=raw["method"],
                       metric=metric, goal=goal, params=params, command=command, early_terminate=early_terminate,
                       raw=raw)


def load_sweep_config(path: str | Path, program: str | None = None) -> SweepConfig:
    """The sweep YAML at `path`; `program`, when given (run_sweep's `--mode`), replaces the file's program (and
    when it is another program, the sweep's name gets the stage: `sweep_config_sft`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep config not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=SweepLoader)
    except yaml.YAMLError as e:
        raise SweepError(f"sweep config {yaml_error(path, e)}") from None
    if program is not None and isinstance(raw, dict):
        # another stage than the one the file names: its own study, <name>_<stage>
        if raw.get("program") and Path(program).name != Path(str(raw["program"])).name:
            stage = next((mode for mode, name in STAGE_PROGRAMS.items() if name == Path(program).name),
                         Path(program).stem)
            raw = {**raw, "name": f"{raw.get('name', path.stem)}_{stage}"}
        raw = {**raw, "program": program}
    try:
        config = parse_sweep_config(raw, default_name=path.stem)
    except SweepError as e:
        raise SweepError(f"{path}: {e}") from None
    if config.command is not None and "${program}" not in config.command:
        return config
    # as W&B does, from the current directory; then this repository's own stages (`program: 4.pretrain.py` from
    # elsewhere): every trial failed with the program not found
    found = next((place for place in (Path(config.program), REPO / config.program) if place.is_file()), None)
    if found is None:
        raise SweepError(f"{path}: program {config.program} not found (in {Path.cwd()} or {REPO})")
    if found.resolve().parent == REPO and found.name in (*STAGE_PROGRAMS.values(), *ONE_PROGRAMS):
        check_stage_parameters(config, path)
    return replace(config, program=str(found.resolve()))


# The seeds' one training programs (mateconv.train.command.main_one_program): their flags are the stages' config keys
ONE_PROGRAMS = ("pretrain_sft_lora.py", "train.py")
# Command-line names a stage program reads beside its config keys (mateconv.config.parse_args)
STAGE_ARGUMENTS = ("mode", "config", "overrides")


def check_stage_parameters(config: SweepConfig, path: Path) -> None:
    """Each parameter of a sweep over a stage program is a config key of it, and each value it may take (`value`,
    `values`) one of that key's: else every trial would fail the same way, one after the other."""
    for param in config.params.values():
        if param.name in STAGE_ARGUMENTS:
            continue
        values = [param.value] if param.distribution == "constant" else list(param.values)
        values = [value for value in values if value is not None]  # null: the flag is left out
        try:
            if not values and param.name != "preset":  # a distribution: its samples are numbers
                resolve(param.name)
            for value in values:
                check_key(param.name, value)
        except ConfigError as e:
            raise SweepError(f"{path}: parameter '{param.name}': {e}") from None
