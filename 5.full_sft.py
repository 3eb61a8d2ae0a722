"""Stage 5: supervised fine-tuning on chat data (loss on assistant tokens only) from out/pretrain/final -> out/sft/.

    python 5.full_sft.py configs/sft_tiny.yaml
    python 5.full_sft.py --use_lora --lora_r 16          # LoRA, merged into the saved model
See docs/training.md for every flag.
"""
from mateconv.terminal import run_main
from mateconv.train.command import main

if __name__ == "__main__":
    run_main(lambda: main("sft"))
