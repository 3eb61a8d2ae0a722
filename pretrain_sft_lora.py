"""Seed 000/001's one training program, as their command lines call it:

    python pretrain_sft_lora.py --mode pretrain --device cpu --batch_size 2 --epochs 1 --dim 128 --n_layers 2
    torchrun --nproc_per_node=2 pretrain_sft_lora.py --mode sft --ddp --batch_size 8 --save_best_only --save_last
runs the stage `--mode` names (4.pretrain.py, 5.full_sft.py, 9.train_dpo.py) with the same flags; docs/training.md.
"""
from mateconv.terminal import run_main
from mateconv.train.command import main_one_program

if __name__ == "__main__":
    run_main(lambda: main_one_program("pretrain_sft_lora"))
