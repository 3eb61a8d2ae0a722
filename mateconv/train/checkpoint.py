"""Checkpoints in `<out_dir>/checkpoints/step_XXXXXXXX/`: written atomically, rotated, with `latest`/`best` pointers.

A checkpoint holds the model, optimizer and scheduler (DeepSpeed's ZeRO-sharded files under DeepSpeed, one
`training_state.pt` otherwise), `trainer_state.json` (step, data position, best validation loss, tracker run id),
every rank's RNG states and the resolved `config.yaml`. Rotation keeps the `keep` newest plus the best one.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mateconv.config import ConfigError, TrainConfig, save_config
from mateconv.files import replace_dir, write_atomic
from mateconv.train.distributed import Runtime, barrier

STEP_DIR = re.compile(r"^step_(\d{8})$")
INCOMING = ".incoming"


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


class CheckpointManager:
    def __init__(self, out_dir: str | Path, keep: int, runtime: Runtime):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep
        self.runtime = runtime

    # ---------------------------------------------------------------------------------------------- listing

    def steps(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def pointer(self, name: str) -> Path | None:
        path = self.root / name
        if not path.is_file():
            return None
        target = self.root / path.read_text().strip()
        return target if (target / "trainer_state.json").is_file() else None

    def resume_path(self, resume: str) -> Path | None:
        """The checkpoint to resume from: "auto" = the latest if any, "never" = none, else a checkpoint directory."""
        if resume == "never":
            return None
        if resume == "auto":
            steps = self.steps()
            return self.pointer("latest") or (steps[-1] if steps else None)
        path = Path(resume)
        if (path / "checkpoints").is_dir():  # an out_dir: its latest checkpoint
            return CheckpointManager(path, self.keep, self.runtime).resume_path("auto")
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"resume: {path} is not a checkpoint directory (no trainer_state.json)")
        return path

    # ---------------------------------------------------------------------------------------------- saving

    def save(self, step: int, engine, optimizer, scheduler, trainer_state: dict, config: TrainConfig,
             is_best: bool) -> Path:
        """Collective: every rank calls it. Writes into `.incoming/step_N`, then rank 0 moves it into place."""
        name = step_name(step)
        incoming = self.root / INCOMING
        tmp = incoming / name
        if self.runtime.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        if self.runtime.use_deepspeed:
            engine.save_checkpoint(str(incoming), tag=name, save_latest=False)
        elif self.runtime.is_main:
            torch.save({"model": unwrap(engine).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, tmp / "training_state.pt")
        torch.save(rng_state(), tmp / f"rng_rank{self.runtime.rank}.pt")
        barrier()
        final = self.root / name
        if self.runtime.is_main:
            save_config(config, tmp / "config.yaml")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            replace_dir(tmp, final)
            write_atomic(self.root / "latest", name)
            if is_best:
                write_atomic(self.root / "best", name)
            self.rotate()
        barrier()
        return final

    def rotate(self) -> None:
        """Delete all but the `keep` newest checkpoints and the best one."""
        steps = self.steps()
        best = self.pointer("best")
        for path in steps[: max(0, len(steps) - self.keep)]:
            if best is None or path.resolve() != best.resolve():
                shutil.rmtree(path)

    # ---------------------------------------------------------------------------------------------- loading

    def load(self, path: Path, engine, optimizer, scheduler) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG; returns trainer_state."""
        state = json.loads((path / "trainer_state.json").read_text())
        if self.runtime.use_deepspeed:
            loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise ConfigError(f"resume: DeepSpeed could not load {path} (saved with another engine?)")
        else:
            if not (path / "training_state.pt").is_file():
                raise ConfigError(f"resume: {path} has no training_state.pt (saved under DeepSpeed? use --engine "
                                  "deepspeed)")
            saved = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
            unwrap(engine).load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        rng_file = path / f"rng_rank{self.runtime.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DeepSpeed engine or DDP wrapper."""
    return getattr(model, "module", model)
