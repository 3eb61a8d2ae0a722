"""Seed 000's evaluation program, as its command lines call it: a streaming chat with a trained model.

    python eval_model.py --model_mode 0 --dim 512 --n_layers 8                  # out/pretrain/final
    python eval_model.py --model_mode 1 --dim 512 --n_layers 8 --stream True    # out/sft/final (2: out/dpo/final)
Flags of scripts/chat.py (--prompt, --temperature, ...) work too; docs/inference.md.
"""
from mateconv.chat import seed_main
from mateconv.terminal import run_main

if __name__ == "__main__":
    run_main(seed_main)
