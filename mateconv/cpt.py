"""Continued pretraining of any Hugging Face causal LM on raw texts, with the stage-4 engine.

    from mateconv.cpt import CPTConfig, CPTTrainer
    loss = CPTTrainer(CPTConfig(model_name_or_path="Qwen/Qwen2.5-0.5B" or a local dir, max_length=512,
                                output_dir="out/cpt")).train(texts)

The settings are seed 002's (Hugging Face TrainingArguments names). The texts are tokenised with the model's own
tokenizer, each followed by its EOS token, and packed into rows of `max_length` tokens that begin at document starts
(mateconv.data.shards.DocumentRows). The result is saved in Hugging Face format to `<output_dir>/final/`.
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


@dataclass(slots=True)  # slots: a misspelt setting (`config.wandb_projet = ...`) is an error, not ignored
class CPTConfig:
    """Seed 002's settings (Hugging Face TrainingArguments names), each mapped onto the stage-4 engine's."""
    model_name_or_path: str
    max_length: int = 512
    trust_remote_code: bool = False
    learning_rate: float = 2e-5
    num_train_epochs: int = 1
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    use_muon_optimizer: bool = False
    use_flash_attention: bool = True  # PyTorch SDPA (FlashAttention kernels on GPUs); False: the plain attention
    use_gradient_checkpointing: bool = False
    use_bf16: bool = True  # bf16 where the GPU has it; fp32 on CPUs
    dataloader_num_workers: int = 0
    output_dir: str = "out/cpt"
    logging_steps: int = 10
    save_steps: int = 500
    save_every_epoch: bool = True  # a checkpoint at each epoch's end too, as seed 002 describes
    eval_steps: int = 500  # with eval_texts: validation loss every this many steps, best/ kept by it
    save_total_limit: int = 3
    max_samples: int | None = None
    max_steps: int = 0
    warmup_steps: int = 0  # > 0 wins over warmup_ratio
    seed: int = 42
    wandb_project: str = ""  # set: the run is logged to W&B (offline without a key)
    logging_dir: str = ""  # set: TensorBoard events go here (beside W&B when wandb_project is set)
    tracker: str = ""  # "" = wandb with wandb_project, else none; or wandb, tensorboard, none

    def train_config(self, resume: str = "never") -> TrainConfig:
        tracker = self.tracker or ("wandb" if self.wandb_project else "none")
        return build_config(dict(
            init_from=self.model_name_or_path, trust_remote_code=self.trust_remote_code, max_seq_len=self.max_length,
            learning_rate=self.learning_rate, epochs=self.num_train_epochs, batch_size=self.per_device_train_batch_size,
            accumulation_steps=self.gradient_accumulation_steps, warmup_iters=self.warmup_steps,
            warmup_ratio=0.0 if self.warmup_steps else self.warmup_ratio, weight_decay=self.weight_decay,
            grad_clip=self.max_grad_norm, optimizer="muon" if self.use_muon_optimizer else "adamw",
            flash_attn=self.use_flash_attention, gradient_checkpointing=self.use_gradient_checkpointing,
            dtype="auto" if self.use_bf16 else "float32", num_workers=self.dataloader_num_workers,
            out_dir=self.output_dir, log_interval=self.logging_steps, save_interval_steps=self.save_steps,
            save_every_epoch=self.save_every_epoch, eval_interval=self.eval_steps,
            keep_checkpoint_max=self.save_total_limit, max_steps=self.max_steps, seed=self.seed, tracker=tracker,
            wandb_project=self.wandb_project, tensorboard_dir=self.logging_dir, val_data_path="",
            resume=resume).items())


class PackedTexts(DocumentRows):
    """Texts tokenised and concatenated (each + EOS) in memory, read as DocumentRows of `seq_len` tokens."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int):
        self.eos_id, self.dtype = tokenizer.eos_token_id, np.dtype(np.int64)
        if self.eos_id is None:
            raise ConfigError("the tokenizer has no eos_token; cannot separate packed documents")
        documents = [ids + [self.eos_id] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        self.stream = np.asarray([token for ids in documents for token in ids], dtype=np.int64)
        # each text is one document, also where it holds the EOS token itself
        self.plan(np.cumsum([len(ids) for ids in documents]) - 1, len(self.stream), seq_len)
        if len(self) == 0:
            raise ConfigError(f"the texts hold {len(self.stream)} tokens, fewer than one row of max_length={seq_len}")

    def tokens(self, begin: int, end: int) -> np.ndarray:
        return self.stream[begin:end]


def read_texts(texts: list[str], eval_texts: list[str] | None, config: TrainConfig, runtime: Runtime,
               tokenizer) -> StageData:
    """The CPT recipe's reader: `texts` (and the held-out `eval_texts`) packed with the model's own tokenizer."""
    if tokenizer is None:
        raise ConfigError(f"{config.checkpoint.init_from} has no tokenizer (tokenizer_config.json)")
    seq_len = config.model.max_seq_len
    train = PackedTexts(texts, tokenizer, seq_len)
    val = PackedTexts(eval_texts, tokenizer, seq_len) if eval_texts else None
    # a tokenizer saved with a model it does not fit (ids beyond its embeddings) is checked against the model
    return StageData(train, val, int(max(data.stream.max() for data in (train, val) if data is not None)) + 1)


class CPTTrainer:
    def __init__(self, config: CPTConfig):
        self.config = config

    def train(self, texts: list[str], eval_texts: list[str] | None = None,
              resume_from_checkpoint: bool | str = False) -> float:
        """Runs continued pretraining; returns the final training loss. With `eval_texts` (held out), the validation
        loss is logged every `eval_steps` and the model with the lowest is kept in `<output_dir>/best/`.
        `resume_from_checkpoint`: True = the newest checkpoint in output_dir (none: a fresh start), or a checkpoint
        directory; the texts must be the same as in the run that wrote it."""
        resume = {True: "auto", False: "never"}.get(resume_from_checkpoint, resume_from_checkpoint)
        train_config = self.config.train_config(str(resume))
        if isinstance(texts, str) or isinstance(eval_texts, str):
            raise ConfigError("texts and eval_texts are lists of strings, one document each; got a single str")
        texts = [t for t in texts if t and t.strip()]
        if self.config.max_samples is not None:
            texts = texts[: self.config.max_samples]
        if not texts:
            raise ConfigError("no non-empty texts to train on")
        eval_texts = [t for t in eval_texts or [] if t and t.strip()]
        return run(Recipe("cpt", partial(read_texts, texts, eval_texts), lm_objective), train_config)["loss"]
