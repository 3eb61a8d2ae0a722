"""Hyperparameter sweep over a stage program, from a YAML file in W&B's sweep schema.

    python run_sweep.py --config configs/sweeps/pretrain_lr.yaml --count 10            # W&B online, else Optuna
    python run_sweep.py --config configs/sweeps/pretrain_lr.yaml --count 10 --backend optuna --gpus 0
    python run_sweep.py --config sweep_config_dpo.yaml --count 5 --mode dpo                 # the seeds' form
See docs/operations.md.
"""
import argparse
import sys
from pathlib import Path

from mateconv.config import STAGE_PROGRAMS
from mateconv.flags import ArgumentParser
from mateconv.sweep.config import SweepError, SweepInterrupted, load_sweep_config
from mateconv.sweep.optuna_backend import run_optuna
from mateconv.sweep.wandb_backend import choose_backend, run_wandb
from mateconv.terminal import run_main

REPO = Path(__file__).resolve().parent


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML (W&B sweep schema)")
    parser.add_argument("--count", type=int, help="trials in total (resumed studies count the finished ones); "
                                                  "grid defaults to the grid size; the YAML's run_cap caps it")
    parser.add_argument("--backend", choices=("auto", "optuna", "wandb"), default="auto",
                        help="auto: wandb when online with an API key or given --sweep_id, else optuna")
    parser.add_argument("--out_dir", default="out/sweeps", help="sweeps root; a sweep writes <out_dir>/<name>/")
    parser.add_argument("--mode", choices=tuple(STAGE_PROGRAMS),
                        help="the stage to sweep (its program replaces the YAML's program)")
    parser.add_argument("--gpus", "--gpu", help="CUDA_VISIBLE_DEVICES for the trials, e.g. 0,1")
    parser.add_argument("--seed", type=int, default=0, help="optuna sampler seed")
    parser.add_argument("--project", help="W&B project (default: the YAML's project, else mateconv)")
    parser.add_argument("--entity", help="W&B entity")
    parser.add_argument("--sweep_id", help="join an existing W&B sweep instead of creating one")
    args = parser.parse_args()
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    try:
        config = load_sweep_config(args.config, str(REPO / STAGE_PROGRAMS[args.mode]) if args.mode else None)
        if choose_backend(args.backend, args.sweep_id) == "wandb":
            sweep_id = run_wandb(config, args.count, Path(args.out_dir), args.gpus, args.project, args.entity,
                                 args.sweep_id)
            print(f"[sweep] W&B sweep {sweep_id} done")
        else:
            sweep_dir = run_optuna(config, args.count, Path(args.out_dir), args.gpus, args.seed)
            print(f"[sweep] summary: {sweep_dir / 'summary.md'}")
    except SweepError as e:
        sys.exit(f"run_sweep: {e}")
    except SweepInterrupted as e:  # said already, with what was kept
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    run_main(main)
