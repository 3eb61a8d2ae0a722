"""Continued pretraining of any Hugging Face causal LM on raw texts, with the stage-4 engine.

    from mateconv.cpt import CPTConfig, CPTTrainer
    loss = CPTTrainer(CPTConfig(model_name_or_path="Qwen/Qwen2.5-0.5B" or a local dir, max_length=512,
                                output_dir="out/cpt")).train(texts)

The texts are tokenised with the model's own tokenizer, each followed by its EOS token, and packed into rows of
`max_length` tokens that begin at document starts (mateconv.data.shards.DocumentRows). The result is saved in Hugging Face format to `<output_dir>/final/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from mateconv.config import ConfigError, TrainConfig, build_config
from mateconv.data.shards import DocumentRows
from mateconv.train.data import StageData
from mateconv.train.distributed import Runtime
from mateconv.train.stages import Recipe, lm_objective, run


@dataclass
class CPTConfig:
    model_name_or_path: str
    max_length: int = 512
    learning_rate: float = 2e-5
    num_train_epochs: int = 1
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    use_muon_optimizer: bool = False
    use_gradient_checkpointing: bool = False
    use_bf16: bool = True  # bf16 where the GPU has it; fp32 on CPUs
    output_dir: str = "out/cpt"
    max_samples: int | None = None
    max_steps: int = 0
    warmup_steps: int = 0
    seed: int = 42
    tracker: str = "none"

    def train_config(self) -> TrainConfig:
        return build_config(dict(
            init_from=self.model_name_or_path, max_seq_len=self.max_length, learning_rate=self.learning_rate,
            epochs=self.num_train_epochs, batch_size=self.per_device_train_batch_size,
            accumulation_steps=self.gradient_accumulation_steps,
            optimizer="muon" if self.use_muon_optimizer else "adamw",
            gradient_checkpointing=self.use_gradient_checkpointing, dtype="auto" if self.use_bf16 else "float32",
            out_dir=self.output_dir, max_steps=self.max_steps, warmup_iters=self.warmup_steps, seed=self.seed,
            tracker=self.tracker, num_workers=0, val_data_path="", resume="never",
            save_interval_steps=10**9, log_interval=1).items())


class PackedTexts(DocumentRows):
    """Texts tokenised and concatenated (each + EOS) in memory, read as DocumentRows of `seq_len` tokens."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int):
        self.eos_id, self.dtype = tokenizer.eos_token_id, np.dtype(np.int64)
        if self.eos_id is None:
            raise ConfigError("the tokenizer has no eos_token; cannot separate packed documents")
        stream: list[int] = []
        for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            stream += ids + [self.eos_id]
        self.stream = np.asarray(stream, dtype=np.int64)
        self.plan(np.flatnonzero(self.stream == self.eos_id), len(self.stream), seq_len)
        if len(self) == 0:
            raise ConfigError(f"the texts hold {len(stream)} tokens, fewer than one row of max_length={seq_len}")

    def tokens(self, begin: int, end: int) -> np.ndarray:
        return self.stream[begin:end]


def read_texts(texts: list[str], config: TrainConfig, runtime: Runtime, tokenizer) -> StageData:
    """The CPT recipe's reader: `texts` packed with the model's own tokenizer."""
    if tokenizer is None:
        raise ConfigError(f"{config.checkpoint.init_from} has no tokenizer (tokenizer_config.json)")
    return StageData(PackedTexts(texts, tokenizer, config.model.max_seq_len))


class CPTTrainer:
    def __init__(self, config: CPTConfig):
        self.config = config
        self.train_config = config.train_config()

    def train(self, texts: list[str]) -> float:
        """Runs continued pretraining; returns the final training loss."""
        texts = [t for t in texts if t and t.strip()]
        if self.config.max_samples is not None:
            texts = texts[: self.config.max_samples]
        if not texts:
            raise ConfigError("no non-empty texts to train on")
        return run(Recipe("cpt", partial(read_texts, texts), lm_objective), self.train_config)["loss"]
