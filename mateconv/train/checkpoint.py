"""Checkpoints in `<out_dir>/checkpoints/step_XXXXXXXX/`: written atomically, rotated, with `latest`/`best` pointers.

A checkpoint holds the model, optimizer and scheduler (DeepSpeed's ZeRO-sharded files under DeepSpeed, one
`training_state.pt` otherwise, gathered in full under FSDP), `trainer_state.json` (step, data position, best validation
loss, tracker run id), every rank's RNG states, the resolved `config.yaml`, `parameters.json` (the model's parameter
shapes: a resume into another model is refused with the settings that differ) and `manifest.json` (every file's size).
Rotation keeps the `keep` newest plus the best one.

Alone (one rank, plain PyTorch) a save copies the state to the CPU and writes the files in a background thread while
training goes on, one save at a time; under DeepSpeed or with several ranks every rank writes its share before going
on.

Faults: a save that fails on any rank (a full disk) leaves the previous checkpoints and `latest` as they were and halts
the run with one line (a background save: at the next step after it failed); a resume checks the checkpoint's files
first (sizes against the manifest, the CRC of every torch file) and falls back to the newest intact one, moving a
damaged one aside as `step_N.damaged`.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from mateconv.config import NAMES, TRAINING_ONLY_MODEL, ConfigError, TrainConfig, config_to_dict, save_config
from mateconv.files import replace_dir, write_atomic
from mateconv.train.distributed import Runtime, barrier, first_error
from mateconv.train.fsdp import NAMED_OPTIMIZER_STATE, full_training_state, load_training_state
from mateconv.train.signals import TrainingHalted
from mateconv.train.universal import load_universal

STEP_DIR = re.compile(r"^step_(\d{8})$")
INCOMING = ".incoming"
REPLACED = "replaced"  # an earlier run's checkpoints past this run's start (set_aside_later)
MANIFEST = "manifest.json"
PARAMETERS = "parameters.json"
CHECKPOINTS = "checkpoints"  # under a run's out_dir


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_problem(path: Path, size: int | None) -> str | None:
    """Why a checkpoint file cannot be trusted (missing, another size than written, a torch zip file whose CRC or
    structure is broken), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{path.name} has {actual} of its {size} bytes"
    if path.suffix != ".pt":
        return None
    if not zipfile.is_zipfile(path):  # torch's zip format lost its end; or the legacy format, of the written size
        return None if size is not None else f"{path.name} is not a complete torch file"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{path.name} is not readable ({e})"
    return f"{path.name} is corrupt (CRC mismatch in {bad})" if bad is not None else None


def checkpoint_problem(path: Path, share: int = 0, shares: int = 1) -> str | None:
    """Why checkpoint `path` cannot be trusted (its trainer state, and its files against the manifest), or None;
    of its files only every `shares`-th from the `share`-th (each rank checks its share)."""
    problem = None
    try:
        json.loads((path / "trainer_state.json").read_text())
        sizes = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else {}
    except (OSError, ValueError) as e:
        problem = f"{e.__class__.__name__}: {e}"
        sizes = {}
    names = sorted(set(sizes) | {p.name for p in path.iterdir() if p.suffix == ".pt"})
    for name in names[share::shares]:
        problem = problem or file_problem(path / name, sizes.get(name))
    return problem


# torch.save on a full disk (or past a file size limit) raises its zip writer's RuntimeError ("[enforce fail at
# inline_container.cc:672] . unexpected pos 576 vs 534"), not the OSError beneath it.
WRITE_ERRORS = (OSError, RuntimeError)


def write_problem(error: Exception | None, directory: Path) -> str | None:
    """A failed checkpoint write in words, or None; torch's own error does not say why, so the space left is added."""
    if error is None:
        return None
    if isinstance(error, OSError):
        return str(error)
    return f"torch could not write the file: {error}; {shutil.disk_usage(directory).free / 2**20:.0f} MiB free in " \
           f"{directory}"


class FailSoftWriter:
    """DeepSpeed's checkpoint writer, made to record a failed write (a full disk) instead of raising it in the middle
    of DeepSpeed's save, where the other ranks would wait for this one in its barriers forever; once every rank is
    through, they agree on the outcome. Later writes of the same save are skipped."""

    def __init__(self, inner):
        self.inner = inner
        self.error: Exception | None = None

    def save(self, state_dict, path: str) -> None:
        if self.error is None:
            try:
                self.inner.save(state_dict, path)
            except WRITE_ERRORS as e:
                self.error = e

    def makedirs(self, path, exist_ok=False) -> None:
        if self.error is None:
            try:
                self.inner.makedirs(path, exist_ok=exist_ok)
            except OSError as e:
                self.error = e

    def __getattr__(self, name):
        return getattr(self.inner, name)


def cpu_copy(value, copies: dict | None = None):
    """A copy of a nested state dict with every tensor copied to the CPU (training goes on changing the originals);
    tensors shared in it (tied weights) stay shared."""
    copies = {} if copies is None else copies
    if isinstance(value, torch.Tensor):
        if id(value) not in copies:
            copies[id(value)] = value.detach().to("cpu", copy=True)
        return copies[id(value)]
    if isinstance(value, dict):
        return {key: cpu_copy(item, copies) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(item, copies) for item in value)
    return value


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


# The settings that change what a model computes and not its parameters' shapes, each with the switch under which it
# counts (None: always): a resume with another value would train on from the checkpoint's weights as another model,
# and its final/ would record the new value.
SAME_SHAPES_OTHER_MODEL = {("model", "rope_theta"): None, ("model", "norm_eps"): None,
                           ("model", "num_experts_per_tok"): ("model", "use_moe"),
                           ("model", "norm_topk_prob"): ("model", "use_moe"),
                           ("model", "scoring_func"): ("model", "use_moe"), ("lora", "alpha"): ("lora", "enabled")}


def training_setting_changes(path: Path, config: TrainConfig) -> list[str]:
    """"NAME A -> B" for each of TRAINING_ONLY_MODEL that this run sets otherwise than checkpoint `path`'s run did."""
    saved = saved_config(path).get("model") or {}
    return [f"{name} {saved[name]} -> {getattr(config.model, name)}" for name in TRAINING_ONLY_MODEL
            if name in saved and saved[name] != getattr(config.model, name)]


def model_differences(saved: dict, current: dict, same_shapes: bool = False) -> list[str]:
    """"NAME A there, B here" for the settings that make a model's parameters: init_from, the model section (when
    neither run started from a saved model; a resume may change its TRAINING_ONLY_MODEL settings) and LoRA; of those
    only SAME_SHAPES_OTHER_MODEL's with `same_shapes`. `saved` and `current` are config_to_dict()s."""
    places = [("checkpoint", "init_from"), *[("lora", name) for name in current["lora"]]]
    if not saved["checkpoint"].get("init_from") and not current["checkpoint"]["init_from"]:
        places += [("model", name) for name in current["model"] if name not in TRAINING_ONLY_MODEL]
    if same_shapes:
        switches = {place: SAME_SHAPES_OTHER_MODEL[place] for place in places if place in SAME_SHAPES_OTHER_MODEL}
        places = [place for place, switch in switches.items() if switch is None or current[switch[0]][switch[1]]]
    return [f"{NAMES[section, name]} {saved[section].get(name)!r} there, {current[section][name]!r} here"
            for section, name in places if saved.get(section, {}).get(name) != current[section][name]]


def saved_config(path: Path) -> dict:
    """The resolved config of the run that wrote checkpoint `path` (its config.yaml, as save_config writes it)."""
    return yaml.safe_load((path / "config.yaml").read_text())


def other_start(path: Path, config: TrainConfig) -> str | None:
    """The model the run of checkpoint `path` started from, when this run names another one with --init_from (the
    resume goes on with the checkpoint's weights, so this run's is not used); else None."""
    saved = (saved_config(path).get("checkpoint") or {}).get("init_from") or ""
    given = config.checkpoint.init_from or ""
    same = saved == given or bool(saved and given) and Path(saved).resolve() == Path(given).resolve()
    return None if same else saved or "scratch"


def pointed_checkpoint(out_dir: str | Path, name: str) -> Path | None:
    """The complete checkpoint a run's `name` pointer ("latest", "best") names, or None."""
    root = Path(out_dir) / CHECKPOINTS
    path = root / name
    if not path.is_file():
        return None
    target = root / path.read_text().strip()
    return target if (target / "trainer_state.json").is_file() else None


class CheckpointManager:
    def __init__(self, out_dir: str | Path, keep: int, runtime: Runtime, shapes: dict[str, list[int]] | None = None):
        """`shapes`: the parameter shapes of the run's model (parameter_shapes), written into each checkpoint."""
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / CHECKPOINTS
        self.keep = keep
        self.runtime = runtime
        self.shapes = shapes
        self.writer: threading.Thread | None = None  # a background save still writing
        self.failure: Exception | None = None  # why the last background save failed, until raised

    # ---------------------------------------------------------------------------------------------- listing

    def steps(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def pointer(self, name: str) -> Path | None:
        return pointed_checkpoint(self.out_dir, name)

    def resume_path(self, resume: str) -> Path | None:
        """The checkpoint to resume from: "auto" = the newest intact one if any (`latest` first), "never" = none, else
        a checkpoint directory (which must be intact) or an out_dir. Collective: every rank calls it."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.newest_intact()
        path = Path(resume)
        if (path / CHECKPOINTS).is_dir():  # an out_dir: its newest intact checkpoint
            return CheckpointManager(path, self.keep, self.runtime, self.shapes).resume_path("auto")
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"resume: {path} is not a checkpoint directory (no trainer_state.json)")
        problem = self.problem(path)
        if problem:
            raise ConfigError(f"resume: {path} is damaged: {problem}")
        return path

    def newest_intact(self) -> Path | None:
        latest = self.pointer("latest")
        named = self.root / "latest"
        if latest is None and named.is_file() and self.runtime.is_main:  # a checkpoint copied in part, or deleted
            print(f"[train] note: `latest` names {named.read_text().strip()}, which is not there or incomplete; "
                  "going on from the newest complete checkpoint", flush=True)
        candidates = ([latest] if latest else []) + [p for p in reversed(self.steps()) if p != latest]
        damaged = []
        for path in candidates:
            problem = self.problem(path)
            if problem is None:
                return path
            damaged.append(path.name)
            if self.runtime.is_main:  # out of the way of rotation and of the next resume; kept for a look
                aside = path.with_name(f"{path.name}.damaged")
                shutil.rmtree(aside, ignore_errors=True)  # an older damaged copy of the same step
                path.rename(aside)
                print(f"[train] checkpoint {path.name} is damaged ({problem}); moved to {path.name}.damaged",
                      flush=True)
            barrier()
        if damaged:
            raise ConfigError(f"resume: no intact checkpoint in {self.root} (damaged: {', '.join(damaged)}); "
                              "use --resume never to start over")
        return None

    def set_aside_later(self, start: Path | None) -> None:
        """Moves this out_dir's checkpoints past `start` (all of them when the run starts fresh) into
        checkpoints/replaced/, which held those of the run before, if any. They belong to an earlier run that went
        further (`--resume never`, or a resume from an older checkpoint): beside this run's they were taken for its
        newest, by rotation and when `latest` is damaged. Pointers to them go too. Saves an earlier run left
        half-written in .incoming/ (killed mid-save) are deleted: nothing else would, and they can be as large as a
        checkpoint. Collective: every rank calls it."""
        start_name = start.name if start is not None and start.parent.resolve() == self.root.resolve() else None
        later = [p for p in self.steps() if start_name is None or p.name > start_name]
        if self.runtime.is_main:
            for cut_short in (self.root / INCOMING).glob("step_*"):
                shutil.rmtree(cut_short)
        if later and self.runtime.is_main:
            replaced = self.root / REPLACED
            shutil.rmtree(replaced, ignore_errors=True)
            replaced.mkdir()
            for name in ("latest", "best"):
                pointed = self.root / name
                if pointed.is_file() and pointed.read_text().strip() in {p.name for p in later}:
                    pointed.rename(replaced / name)
            for path in later:
                path.rename(replaced / path.name)
            print(f"[train] {len(later)} checkpoint(s) of an earlier run past this run's start "
                  f"({later[0].name} to {later[-1].name}) moved to {replaced}", flush=True)
        barrier()

    def problem(self, path: Path) -> str | None:
        """Why checkpoint `path` cannot be resumed from, or None. Each rank checks its share of the files, so the
        checkpoint is read once in all; every rank gets the same answer."""
        return first_error(checkpoint_problem(path, self.runtime.rank, self.runtime.world_size))

    # ---------------------------------------------------------------------------------------------- saving

    def save(self, step: int, engine, optimizer, scheduler, trainer_state: dict, config: TrainConfig,
             is_best: bool) -> None:
        """Collective: every rank calls it. Alone (one rank, plain PyTorch) the state is copied now and written in the
        background (`wait`, `raise_failure`)."""
        self.wait()
        if self.runtime.use_deepspeed or self.runtime.world_size > 1 or self.runtime.fsdp:
            self._save(step, lambda tmp: self._write(engine, optimizer, scheduler, tmp), trainer_state, config,
                       is_best)
            return
        state = cpu_copy({"model": unwrap(engine).state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict()})
        rng = rng_state()

        def write(tmp: Path) -> Exception | None:
            try:
                torch.save(state, tmp / "training_state.pt")
                torch.save(rng, tmp / "rng_rank0.pt")
            except WRITE_ERRORS as e:
                return e
            return None

        def run() -> None:
            try:
                self._save(step, write, trainer_state, config, is_best)
            except Exception as e:  # raised in the training thread
                self.failure = e

        self.writer = threading.Thread(target=run, name=f"checkpoint-{step_name(step)}")
        self.writer.start()

    def wait(self) -> None:
        """Until a background save is written; raises its failure (TrainingHalted)."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        self.raise_failure()

    def raise_failure(self) -> None:
        """Raises the failure of a background save that has failed (TrainingHalted); called every step."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _save(self, step: int, write: Callable[[Path], Exception | None], trainer_state: dict, config: TrainConfig,
              is_best: bool) -> None:
        """Writes into `.incoming/step_N` (this rank's files by `write`), then rank 0 moves it into place. A write
        that fails on any rank (WRITE_ERRORS: a full disk) raises TrainingHalted on every rank; the earlier checkpoints
        and `latest` are untouched and the half-written one is deleted."""
        name = step_name(step)
        incoming = self.root / INCOMING
        tmp = incoming / name
        error = None
        if self.runtime.is_main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        if first_error(write_problem(error, self.root)) is None:
            error = write(tmp)
        if self.runtime.is_main and error is None:
            try:
                save_config(config, tmp / "config.yaml")
                if self.shapes is not None:
                    (tmp / PARAMETERS).write_text(json.dumps(self.shapes))
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            except OSError as e:
                error = e
        failed = first_error(write_problem(error, self.root))
        if failed is None and self.runtime.is_main:
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            try:
                (tmp / MANIFEST).write_text(json.dumps(sizes, indent=1))
                replace_dir(tmp, self.root / name)
                write_atomic(self.root / "latest", name)
                if is_best:
                    write_atomic(self.root / "best", name)
            except OSError as e:
                error = e
        failed = failed or first_error(write_problem(error, self.root))
        if failed is not None:
            if self.runtime.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            latest = self.pointer("latest")
            kept = f"{latest.name} and `latest` are intact" if latest else "no earlier checkpoint was written"
            raise TrainingHalted(f"saving checkpoint {name} failed ({failed}); {kept}; free some space, then run the "
                                 "same command to resume")
        if self.runtime.is_main:
            self.rotate()
        barrier()

    def _write(self, engine, optimizer, scheduler, tmp: Path) -> Exception | None:
        """This rank's files of the checkpoint: DeepSpeed's (every rank) or training_state.pt (rank 0), and its RNG."""
        try:
            if self.runtime.use_deepspeed:
                if not isinstance(engine.checkpoint_engine, FailSoftWriter):
                    engine.checkpoint_engine = FailSoftWriter(engine.checkpoint_engine)
                writer = engine.checkpoint_engine
                writer.error = None
                engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
                if writer.error is not None:
                    return writer.error
            elif self.runtime.fsdp:
                state = full_training_state(engine, optimizer)  # collective: every rank sends its shards
                if self.runtime.is_main:
                    torch.save({**state, "scheduler": scheduler.state_dict()}, tmp / "training_state.pt")
            elif self.runtime.is_main:
                torch.save({"model": unwrap(engine).state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, tmp / "training_state.pt")
            torch.save(rng_state(), tmp / f"rng_rank{self.runtime.rank}.pt")
        except WRITE_ERRORS as e:
            return e
        return None

    def rotate(self) -> None:
        """Delete all but the `keep` newest checkpoints and the best one."""
        steps = self.steps()
        best = self.pointer("best")
        for path in steps[: max(0, len(steps) - self.keep)]:
            if best is None or path.resolve() != best.resolve():
                shutil.rmtree(path)

    # ---------------------------------------------------------------------------------------------- loading

    def check_stage(self, path: Path, stage: str | None) -> None:
        """A checkpoint of another stage (SFT pointed at pretraining's out_dir) would go on as if it were this one's:
        its step, optimizer state, data position and best validation loss."""
        saved = json.loads((path / "trainer_state.json").read_text()).get("stage")
        if saved is not None and stage is not None and saved != stage:
            raise ConfigError(f"resume: {path} is a checkpoint of {saved}, this run is {stage}: give this run its own "
                              f"--out_dir (to start from that run's model: --init_from {path})")

    def check_model(self, path: Path, config: TrainConfig) -> None:
        """A checkpoint of another model than this run's (another size, MoE or dense, another init_from or LoRA, or
        with the same shapes another rope_theta, lora_alpha, ...) is an error naming the settings that differ, before
        anything is loaded (else load_state_dict's traceback, or a run going on as another model)."""
        if self.shapes is None or not (path / PARAMETERS).is_file():  # saved before checkpoints recorded the shapes
            return
        saved = json.loads((path / PARAMETERS).read_text())
        same_shapes = saved == self.shapes
        differences = model_differences(saved_config(path), config_to_dict(config), same_shapes)
        if same_shapes and not differences:
            return
        if not differences:  # the same settings, another model (its code changed): name one parameter
            name = next(n for n in [*self.shapes, *saved] if saved.get(n) != self.shapes.get(n))
            differences = [f"{name} {saved.get(name, 'absent')} there, {self.shapes.get(name, 'absent')} here"]
        raise ConfigError(f"resume: {path} holds another model ({'; '.join(differences[:4])}): give this run its own "
                          f"--out_dir, or pass --resume never to start {self.out_dir} over (its checkpoints and final/ "
                          "are replaced)")

    def check_engine(self, path: Path, config: TrainConfig) -> None:
        """A checkpoint loads only under the kind of engine that wrote it, DeepSpeed or plain PyTorch/FSDP (DeepSpeed's
        loader ends in a bare AssertionError on the other's), and DeepSpeed's only under the ZeRO stage that wrote it;
        another number of ranks is fine (mateconv.train.universal)."""
        by_deepspeed = any(path.glob("*model_states.pt"))
        if by_deepspeed != self.runtime.use_deepspeed:
            engines = {True: "DeepSpeed", False: "PyTorch (--engine torch or fsdp)"}
            engine = "deepspeed" if by_deepspeed else "torch (under the deepspeed launcher too)"
            raise ConfigError(f"resume: {path} was saved by {engines[by_deepspeed]}, this run uses "
                              f"{engines[not by_deepspeed]}: resume with --engine {engine}, or start a new run from "
                              f"its weights with --init_from {path} and its own --out_dir")
        if not by_deepspeed:
            return
        saved = saved_config(path)["parallel"]["zero_stage"]
        stage = config.parallel.zero_stage
        if saved != stage:
            raise ConfigError(f"resume: {path} was saved under ZeRO-{saved}, this run has --zero_stage {stage}: "
                              f"resume with --zero_stage {saved} (on any number of ranks), or start a new run from its "
                              f"weights with --init_from {path} and its own --out_dir")

    def check_optimizer(self, path: Path, config: TrainConfig) -> None:
        """An AdamW state does not load into Muon or back (torch's loader ends in a KeyError): one line instead."""
        saved = saved_config(path).get("optim", {}).get("optimizer")
        chosen = config.optim.optimizer
        if saved is not None and saved != chosen:
            raise ConfigError(f"resume: {path} was saved with --optimizer {saved}, this run has --optimizer {chosen}: "
                              f"resume with --optimizer {saved}, or start a new run from its weights with --init_from "
                              f"{path} and its own --out_dir")

    def load(self, path: Path, engine, optimizer, scheduler) -> tuple[dict, dict | None]:
        """Restore model, optimizer and scheduler; returns trainer_state and this rank's saved RNG state (None for a
        rank the checkpoint's run did not have), for the caller to restore right before the first step."""
        state = json.loads((path / "trainer_state.json").read_text())
        if "micro_in_epoch" in state:  # written before the data position counted the samples of all ranks
            batch_size = saved_config(path)["optim"]["batch_size"]
            state["samples_in_epoch"] = state.pop("micro_in_epoch") * batch_size * len(list(path.glob("rng_rank*.pt")))
        if self.runtime.use_deepspeed:
            if engine.load_universal_checkpoint():  # a ZeRO checkpoint of another number of ranks
                loaded = load_universal(engine, path, self.runtime)
            else:
                loaded = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)[0] is not None
            if not loaded:
                raise ConfigError(f"resume: DeepSpeed could not load {path} (saved with another engine?)")
        else:
            saved = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
            if self.runtime.fsdp or NAMED_OPTIMIZER_STATE in saved:  # each engine resumes the other's checkpoints
                load_training_state(unwrap(engine), optimizer, saved)
            else:
                unwrap(engine).load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        rng_file = path / f"rng_rank{self.runtime.rank}.pt"
        return state, torch.load(rng_file, weights_only=False) if rng_file.is_file() else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DeepSpeed engine or DDP wrapper."""
    return getattr(model, "module", model)
