"""Stage 4: pretraining (or continued pretraining of a Hugging Face model with --init_from) -> out/pretrain/.

    python 4.pretrain.py configs/pretrain_tiny.yaml --overrides learning_rate=2e-5 batch_size=32
    deepspeed --num_gpus=2 4.pretrain.py configs/mateconv_0.02b.yaml --zero_stage 2
See docs/training.md for every flag.
"""
import sys

from mateconv.train.stages import main

if __name__ == "__main__":
    sys.exit(main("pretrain"))
