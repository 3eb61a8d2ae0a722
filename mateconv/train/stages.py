"""Stage entry points: `4.pretrain.py` and `5.full_sft.py` call `main("pretrain" | "sft", argv)`."""
from __future__ import annotations

import sys
from pathlib import Path

from mateconv.config import ConfigError, TrainConfig, help_text, parse_config
from mateconv.data import DataError
from mateconv.train.distributed import setup, shutdown
from mateconv.train.engine import Trainer, seed_everything
from mateconv.train.models import build_model, load_tokenizer
from mateconv.train.objectives import LMObjective

STAGE_DEFAULTS = {
    "pretrain": {"out_dir": "out/pretrain", "data_path": "out/tokens/pretrain/train",
                 "val_data_path": "out/tokens/pretrain/val"},
    "sft": {"out_dir": "out/sft", "data_path": "out/tokens/sft/train", "val_data_path": "out/tokens/sft/val",
            "init_from": "out/pretrain/final", "learning_rate": 1e-4, "warmup_iters": 20},
}


def token_datasets(stage: str, config: TrainConfig):
    """(train, val or None) token-shard readers for the stage; checks the data fits the model's vocabulary."""
    from mateconv.data.shards import PretrainTokens, SFTTokens, shard_info

    reader = PretrainTokens if stage == "pretrain" else SFTTokens
    paths = [config.data_path] + ([config.val_data_path] if config.val_data_path else [])
    for path in paths:
        if not Path(path).is_dir():
            raise DataError(f"token shards not found: {path} (run 3.dataset.py, or set data_path/val_data_path; "
                            "val_data_path '' disables validation)")
    train = reader(config.data_path, config.max_seq_len)
    val = reader(config.val_data_path, config.max_seq_len) if config.val_data_path else None
    return train, val, shard_info(config.data_path)["vocab_size"]


def check_vocab(model, data_vocab: int) -> None:
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if data_vocab > model_vocab:
        raise ConfigError(f"the token shards use a vocabulary of {data_vocab} but the model has {model_vocab} "
                          "embeddings (set vocab_size, or tokenize with the model's tokenizer)")


def run(stage: str, config: TrainConfig) -> dict:
    runtime = setup(config)
    train, val, data_vocab = token_datasets(stage, config)
    seed_everything(config.seed)  # identical initial weights on every rank
    model = build_model(config)
    check_vocab(model, data_vocab)
    tokenizer = load_tokenizer(config)
    if runtime.is_main:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[{stage}] {type(model).__name__}: {trainable / 1e6:.2f}M trainable parameters, "
              f"{'DeepSpeed ZeRO-' + str(config.zero_stage) if runtime.use_deepspeed else 'PyTorch'}, "
              f"{runtime.world_size} rank(s), {runtime.device}, {str(runtime.dtype).removeprefix('torch.')}, "
              f"{len(train)} training sequences", flush=True)
    return Trainer(config, runtime, model, LMObjective(), train, val, tokenizer).fit()


def main(stage: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(f"usage: {stage} [CONFIG.yaml] [--key value ...] [--overrides key=value ...]\n{help_text()}")
        return 0
    try:
        summary = run(stage, parse_config(argv, STAGE_DEFAULTS[stage]))
    except (ConfigError, DataError) as e:
        sys.exit(f"{stage}: {e}")
    shutdown()
    if not summary["stopped"] and summary["is_main"]:
        print(f"[{stage}] done: step {summary['step']}, loss {summary['loss']:.4f}"
              + (f", val_loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""), flush=True)
    return 0
