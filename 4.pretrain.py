"""Stage 4: pretraining (or continued pretraining of a Hugging Face model with --init_from) -> out/pretrain/.

    python 4.pretrain.py configs/pretrain_tiny.yaml --overrides learning_rate=2e-5 batch_size=32
    deepspeed --num_gpus=2 4.pretrain.py configs/mateconv_0.02b.yaml --zero_stage 2
See docs/training.md for every flag.
"""
from mateconv.terminal import run_main
from mateconv.train.command import main

if __name__ == "__main__":
    run_main(lambda: main("pretrain"))
