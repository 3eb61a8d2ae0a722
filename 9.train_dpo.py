"""Stage 9: DPO of the SFT model against a frozen reference, with forgetting measured (see docs/dpo.md).

    python 9.train_dpo.py --dpo_beta 0.1 --max_steps 500
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 9.train_dpo.py --zero_stage 2 --precompute_ref
"""
from mateconv.terminal import run_main
from mateconv.train.command import main

if __name__ == "__main__":
    run_main(lambda: main("dpo"))
