"""Stage 3: tokenize out/data into packed, memory-mapped token shards in out/tokens (see docs/data.md).

    python 3.dataset.py --all                       # every {pretrain,sft,dpo}_{train,val}.jsonl in out/data
    python 3.dataset.py --kind pretrain --input out/data/pretrain_train.jsonl --out_dir out/tokens/pretrain/train
"""
from mateconv.data.tokenizing import main
from mateconv.terminal import run_main

if __name__ == "__main__":
    run_main(main)
