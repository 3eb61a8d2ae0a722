"""Seed 003's training program, as its command lines call it:

    python train.py config.yml                                   # loss.name in the config: sft, dpo or ipo
    python train.py config.yml --overrides lr=2e-5 batch_size=32
    python train.py config.yml --overrides trainer=FSDPTrainer
runs the stage the config's `loss.name` names (5.full_sft.py or 9.train_dpo.py), reading seed 003's keys (`model:
{name_or_path, policy_dtype, archive}`, `datasets`, `total_batch_size`, `n_epochs`, `wandb: {...}`, ...) and ours;
docs/training.md.
"""
from mateconv.terminal import run_main
from mateconv.train.command import main_one_program

if __name__ == "__main__":
    run_main(lambda: main_one_program("train"))
