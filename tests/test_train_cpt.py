"""Continued pretraining of a Hugging Face model (a tiny random Qwen2 built locally, no download): via
`4.pretrain.py --init_from` and via the CPTTrainer API; both save a model AutoModelForCausalLM reloads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mateconv.config import ConfigError, parse_config
from mateconv.cpt import CPTConfig, CPTTrainer, PackedTexts
from mateconv.train.models import build_model
from mateconv.train.stages import RECIPES, run
from conftest import losses, read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tiny_qwen(tiny_tokenizer, tmp_path):
    """A randomly initialised 2-layer Qwen2 with the tiny tokenizer, saved like a downloaded model."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    path = tmp_path / "qwen2-tiny"
    Qwen2ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(path)
    return path


@pytest.fixture
def tiny_neox(tiny_embedded_data, tmp_path):
    """A randomly initialised 2-layer GPT-NeoX (Pythia's architecture) with a byte-level BPE tokenizer of its own
    whose one special token is its eos, <|endoftext|> (as Pythia's, Llama's and GPT-2's: no ChatML tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (tiny_embedded_data / "pretrain_train.jsonl").open(encoding="utf-8")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "neox-tiny"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(
        path)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=256, bos_token_id=0,
                                     eos_token_id=0)).save_pretrained(path)
    return path


def test_a_model_whose_tokenizer_has_no_chatml(tiny_neox, tiny_embedded_data, tiny_flags, tmp_path, capsys, caplog):
    """A Pythia-shaped model: 4.pretrain.py on a raw text file ends documents with the model's own eos; SFT first
    adds the ChatML tokens to its tokenizer and embeddings (once, into out_dir/chatml_start) and then trains; DPO
    straight from it, and LoRA SFT, say in one line what stops them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mateconv.data import DataError

    out = tmp_path / "pretrain"
    run(RECIPES["pretrain"], parse_config(tiny_flags(out, init_from=tiny_neox, val_data_path="", max_steps=8,
                                                     vocab_size=400,  # the model's own: another one is an error
                                                     tokenizer_path=tiny_neox,
                                                     data_path=tiny_embedded_data / "pretrain_train.jsonl")))
    curve = losses(out)
    assert curve[8] < curve[1]
    index = json.loads((out / "data_tokens" / "train" / "index.json").read_text())
    assert (index["eos_id"], index["pad_id"], index["vocab_size"]) == (0, 0, 400)
    assert type(AutoModelForCausalLM.from_pretrained(out / "final")).__name__ == "GPTNeoXForCausalLM"

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"The answer is {2 * i}."}]})
                            + "\n" for i in range(64)))
    sft = tmp_path / "sft"
    flags = dict(init_from=out / "final", data_path=chat, val_data_path="", max_steps=12, batch_size=8, vocab_size=400,
                 tokenizer_path=tiny_neox)
    capsys.readouterr()
    run(RECIPES["sft"], parse_config(tiny_flags(sft, "sft", **flags), RECIPES["sft"].defaults))
    assert "tokenizer has no ChatML tokens: added <|im_start|> and <|im_end|>" in capsys.readouterr().out
    assert not [r for r in caplog.records if "multivariate" in r.getMessage()]  # our line says it, in one
    curve = losses(sft)
    assert curve[12] < 0.7 * curve[1]
    tokenizer, model = AutoTokenizer.from_pretrained(sft / "final"), AutoModelForCausalLM.from_pretrained(sft / "final")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|im_end|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.get_input_embeddings().num_embeddings == 448 and model.config.eos_token_id == tokenizer.eos_token_id
    made = (sft / "chatml_start" / "model.safetensors").stat().st_mtime_ns
    run(RECIPES["sft"], parse_config(tiny_flags(sft, "sft", **{**flags, "max_steps": 13}), RECIPES["sft"].defaults))
    assert (sft / "chatml_start" / "model.safetensors").stat().st_mtime_ns == made  # made once: a resume reuses it
    assert sorted(losses(sft)) == list(range(1, 14))

    with pytest.raises(DataError, match="has no <\\|im_start\\|> / <\\|im_end\\|> tokens: DPO conversations are"):
        run(RECIPES["dpo"], parse_config(tiny_flags(tmp_path / "dpo", "dpo", init_from=tiny_neox, vocab_size=400,
                                                    tokenizer_path=tiny_neox, data_path=chat, val_data_path=""),
                                         RECIPES["dpo"].defaults))
    with pytest.raises(ConfigError, match="LoRA would leave their new embeddings untrained"):
        run(RECIPES["sft"], parse_config(tiny_flags(tmp_path / "lora", "sft", **flags, use_lora=True)))


def test_init_from_hf_model(tiny_qwen, tiny_flags, tmp_path):
    # model-shape flags (dim 64 etc. from tiny_flags, and a deliberately wrong n_layers) are ignored with init_from
    summary = run(RECIPES["pretrain"], parse_config(tiny_flags(tmp_path / "run", init_from=tiny_qwen, max_steps=8,
                                                               n_layers=7, learning_rate=3e-3)))
    curve = losses(tmp_path / "run")
    assert summary["step"] == 8 and curve[8] < curve[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").vocab_size == 512
    # flash_attn (seed 002's use_flash_attention) picks the HF model's attention too: SDPA, or the plain one
    attention = {flash: build_model(parse_config(tiny_flags(tmp_path / "run", init_from=tiny_qwen, flash_attn=flash)))
                 .config._attn_implementation for flash in (True, False)}
    assert attention == {True: "sdpa", False: "eager"}


def test_cpt_trainer_api(tiny_qwen, tiny_embedded_data, tmp_path):
    lines = (tiny_embedded_data / "pretrain_train.jsonl").read_text(encoding="utf-8").splitlines()[:150]
    texts = [json.loads(line)["text"] for line in lines]
    trainer = CPTTrainer(CPTConfig(model_name_or_path=str(tiny_qwen), max_length=64, learning_rate=3e-3,
                                   num_train_epochs=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                   use_muon_optimizer=True, use_gradient_checkpointing=True, use_bf16=False,
                                   output_dir=str(tmp_path / "cpt"), max_samples=100, max_steps=6, logging_steps=1))
    final_loss = trainer.train(texts)
    curve = losses(tmp_path / "cpt")
    assert final_loss == pytest.approx(curve[6]) and curve[6] < curve[1]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt" / "final")
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    assert reloaded.config.use_cache  # trained with gradient checkpointing, it still generates with its cache
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(reloaded.state_dict()[weight], original.state_dict()[weight])


# Seed 002's "advanced" CPTConfig, every setting as the seed writes it; the test shrinks only the sizes.
SEED_002_ADVANCED = dict(
    model_name_or_path="Qwen/Qwen2.5-7B", max_length=4096, learning_rate=3e-5, num_train_epochs=5,
    per_device_train_batch_size=1, gradient_accumulation_steps=16, warmup_ratio=0.1, weight_decay=0.01,
    max_grad_norm=1.0, use_muon_optimizer=True, use_flash_attention=True, use_gradient_checkpointing=True,
    use_bf16=True, dataloader_num_workers=8, output_dir="./large_scale_cpt", logging_steps=50, save_steps=1000,
    eval_steps=1000, save_total_limit=5, max_samples=100000)


def test_seed_002_settings_map_onto_the_engine():
    engine = CPTConfig(**SEED_002_ADVANCED).train_config()
    assert (engine.checkpoint.init_from, engine.model.max_seq_len, engine.optim.learning_rate, engine.optim.epochs,
            engine.optim.batch_size, engine.optim.accumulation_steps, engine.optim.warmup_ratio,
            engine.optim.weight_decay, engine.optim.grad_clip, engine.optim.optimizer, engine.model.flash_attn,
            engine.parallel.gradient_checkpointing, engine.parallel.dtype, engine.data.num_workers,
            engine.checkpoint.out_dir, engine.track.log_interval, engine.checkpoint.save_interval_steps,
            engine.track.eval_interval, engine.checkpoint.keep_checkpoint_max, engine.track.tracker) == (
        "Qwen/Qwen2.5-7B", 4096, 3e-5, 5, 1, 16, 0.1, 0.01, 1.0, "muon", True, True, "auto", 8, "./large_scale_cpt",
        50, 1000, 1000, 5, "none")
    steps = CPTConfig(**{**SEED_002_ADVANCED, **dict(warmup_steps=20, use_bf16=False, use_flash_attention=False)})
    steps = steps.train_config()
    assert (steps.optim.warmup_iters, steps.optim.warmup_ratio, steps.parallel.dtype, steps.model.flash_attn) == (
        20, 0.0, "float32", False)  # warmup_steps wins over warmup_ratio, as in transformers


def test_seed_002_settings_evaluation_tracking_and_resume(tiny_qwen, tiny_embedded_data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb_records import records

    monkeypatch.setenv("WANDB_MODE", "offline")
    lines = (tiny_embedded_data / "pretrain_train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    out = tmp_path / "cpt"
    config = CPTConfig(**{**SEED_002_ADVANCED, **dict(
        model_name_or_path=str(tiny_qwen), max_length=64, learning_rate=3e-3, num_train_epochs=1,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, dataloader_num_workers=1,
        output_dir=str(out), logging_steps=1, save_steps=2, eval_steps=3, save_total_limit=2, max_samples=120,
        max_steps=6)})
    config.wandb_project = "qwen2.5-cpt"  # the seed's "experiment tracking" lines
    config.logging_dir = str(tmp_path / "logs")
    with pytest.raises(AttributeError):
        config.wandb_projet = "typo"
    first = CPTTrainer(config).train(texts[:150], eval_texts=texts[150:190])
    rows = read_metrics(out)
    curve = losses(out)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6] and first == pytest.approx(curve[6])
    # every eval_steps, and at each save (best/ is chosen among the saved steps)
    assert [row["step"] for row in rows if "val_loss" in row] == [2, 3, 4, 6]
    assert (out / "best" / "config.json").is_file() and (out / "final" / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    events = EventAccumulator(config.logging_dir)
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    run_file = next((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert {r.run.project for r in records(run_file) if r.WhichOneof("record_type") == "run"} == {"qwen2.5-cpt"}
    # resumed from the step-4 checkpoint, the run repeats steps 5 and 6 exactly
    CPTTrainer(config).train(texts[:150], eval_texts=texts[150:190],
                             resume_from_checkpoint=str(out / "checkpoints" / "step_00000004"))
    resumed = losses(out)
    assert [resumed[step] for step in (5, 6)] == pytest.approx([curve[5], curve[6]], rel=1e-5)


def test_a_checkpoint_at_each_epoch_end(tiny_qwen, tiny_embedded_data, tmp_path):
    from transformers import AutoTokenizer

    lines = (tiny_embedded_data / "pretrain_train.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    texts = [json.loads(line)["text"] for line in lines]
    per_epoch = len(PackedTexts(texts, AutoTokenizer.from_pretrained(tiny_qwen), 64)) // 4
    out = tmp_path / "cpt"
    CPTTrainer(CPTConfig(model_name_or_path=str(tiny_qwen), max_length=64, num_train_epochs=3, use_bf16=False,
                         per_device_train_batch_size=4, save_steps=1000, output_dir=str(out))).train(texts)
    assert per_epoch >= 2 and [int(p.name.removeprefix("step_")) for p in sorted((out / "checkpoints").glob("step_*"))
                               ] == [per_epoch, 2 * per_epoch, 3 * per_epoch]


def test_trust_remote_code(tiny_qwen, tiny_embedded_data, tmp_path):
    """A model directory that ships its own modelling code (config.json auto_map) loads only when trusted."""
    config = json.loads((tiny_qwen / "config.json").read_text())
    config.update(model_type="tiny_remote", auto_map={"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                                                      "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM"})
    (tiny_qwen / "config.json").write_text(json.dumps(config))
    (tiny_qwen / "configuration_tiny.py").write_text(
        "from transformers import Qwen2Config\n\n\n"
        "class TinyRemoteConfig(Qwen2Config):\n    model_type = 'tiny_remote'\n")
    (tiny_qwen / "modeling_tiny.py").write_text(
        "from transformers import Qwen2ForCausalLM\n\nfrom .configuration_tiny import TinyRemoteConfig\n\n\n"
        "class TinyRemoteForCausalLM(Qwen2ForCausalLM):\n    config_class = TinyRemoteConfig\n")
    lines = (tiny_embedded_data / "pretrain_train.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    texts = [json.loads(line)["text"] for line in lines]
    settings = dict(model_name_or_path=str(tiny_qwen), max_length=64, use_bf16=False, output_dir=str(tmp_path / "cpt"),
                    max_steps=2)
    with pytest.raises(ConfigError, match="init_from: cannot load .*; set trust_remote_code true"):
        CPTTrainer(CPTConfig(**settings)).train(texts)
    CPTTrainer(CPTConfig(**settings, trust_remote_code=True)).train(texts)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt" / "final", trust_remote_code=True)
    assert type(reloaded).__name__ == "TinyRemoteForCausalLM"


def test_packed_texts_and_errors(tiny_qwen):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    texts = [" ".join(["to be or not to be"] * (1 + i % 2) + ["that is the question"] * (i % 3)) for i in range(120)]
    data = PackedTexts(texts, tokenizer, 64)
    rows = [data[i]["input_ids"].tolist() for i in range(len(data))]
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    starts = np.cumsum([0] + [len(doc) for doc in docs])[:-1].tolist()
    # rows of 64 tokens from the EOS-separated stream; fewer tokens are read without the beginning of their
    # document than in plain 63-token windows
    assert len(rows) > 10 and all(len(row) == 64 for row in rows)
    assert data.stream.tolist() == [token for doc in docs for token in doc]
    cut_off = sum(n for start, n in zip(data.piece_starts.tolist(), data.piece_lengths.tolist()) if start not in starts)
    by_windows = sum(start + len(doc) - (start + len(doc) - 1) // 63 * 63 for start, doc in zip(starts, docs)
                     if start // 63 != (start + len(doc) - 1) // 63)
    assert cut_off < 0.6 * by_windows, (cut_off, by_windows)
    with pytest.raises(ConfigError, match="fewer than one row"):
        PackedTexts(["short"], tokenizer, 4096)
    with pytest.raises(ConfigError, match="init_from: /nonexistent/model does not exist"):
        CPTTrainer(CPTConfig(model_name_or_path="/nonexistent/model")).train(["text"])
    with pytest.raises(ConfigError, match="lists of strings, one document each"):
        CPTTrainer(CPTConfig(model_name_or_path=str(tiny_qwen))).train("one long text")


def test_a_model_with_learned_positions_takes_rows_as_long_as_its_table(tiny_neox, tiny_embedded_data, tmp_path):
    """GPT-2 looks positions up in a table (here of 64): max_length 128 is refused in one line naming the limit (it
    was an IndexError deep in the first forward); 64 trains."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2-tiny"
    AutoTokenizer.from_pretrained(tiny_neox).save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(path)
    texts = [json.loads(line)["text"] for line in (tiny_embedded_data / "pretrain_train.jsonl").open(encoding="utf-8")]
    settings = dict(model_name_or_path=str(path), use_bf16=False, output_dir=str(tmp_path / "cpt"), max_steps=1)
    with pytest.raises(ConfigError, match="learned position embeddings for 64 tokens, fewer than max_seq_len 128"):
        CPTTrainer(CPTConfig(**settings, max_length=128)).train(texts)
    assert np.isfinite(CPTTrainer(CPTConfig(**settings, max_length=64)).train(texts))


def test_a_tokenizer_beyond_the_model_embeddings_is_one_line(tiny_tokenizer, tiny_embedded_data, tmp_path):
    """A model directory whose tokenizer (512 tokens) does not fit its embeddings (300): refused before training,
    naming both sizes (it was an IndexError in the first forward)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path / "mismatched"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(path)
    texts = [json.loads(line)["text"] for line in (tiny_embedded_data / "pretrain_train.jsonl").open(encoding="utf-8")]
    config = CPTConfig(model_name_or_path=str(path), max_length=64, use_bf16=False,
                       output_dir=str(tmp_path / "runs" / "cpt"))
    with pytest.raises(ConfigError, match=r"token ids need a vocabulary of 5\d\d but the model has 300 embeddings"):
        CPTTrainer(config).train(texts)
    assert not (tmp_path / "runs").exists()  # refused before it wrote anything: no directory it made is left


def test_a_weights_file_cut_short_is_one_line(tiny_qwen):
    """model.safetensors cut short (an interrupted copy): init_from names the model and the damage (safetensors'
    own error went up as a traceback)."""
    weights = tiny_qwen / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    with pytest.raises(ConfigError, match=r"init_from: cannot load a causal LM from .*qwen2-tiny \(.*incomplete"):
        CPTTrainer(CPTConfig(model_name_or_path=str(tiny_qwen), max_length=64)).train(["some text"] * 50)


def test_init_from_a_file_names_the_directory_to_give(tiny_qwen):
    """init_from naming the weights file or config.json of a model: one line saying to name its directory (it was
    transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'")."""
    for name in ("model.safetensors", "config.json"):
        with pytest.raises(ConfigError, match=rf"init_from: .*{name} is a file; name the model directory"):
            CPTTrainer(CPTConfig(model_name_or_path=str(tiny_qwen / name))).train(["some text"] * 50)


def test_token_shards_of_another_tokenizer_are_one_line(tiny_qwen, tiny_neox, tiny_embedded_data, tiny_flags,
                                                         tmp_path):
    """4.pretrain.py --init_from MODEL on shards that another tokenizer made (Pythia's 400 tokens for a 512-token
    Qwen2: every id fits the embeddings) is refused in one line naming both; it trained on them without a word."""
    from mateconv.data import DataError
    from mateconv.data.tokenizing import build_shards

    shards = tmp_path / "tokens_of_neox"
    build_shards("pretrain", [tiny_embedded_data / "pretrain_train.jsonl"], tiny_neox, shards, workers=1,
                 progress=False)
    flags = tiny_flags(tmp_path / "run", init_from=tiny_qwen, data_path=shards, val_data_path="", max_steps=2)
    with pytest.raises(DataError, match=rf"^{shards} was tokenized with a 400-token vocabulary, the model's tokenizer "
                                        rf"has 512 \(another tokenizer\): tokenize it with {tiny_qwen}'s tokenizer"):
        run(RECIPES["pretrain"], parse_config(flags))
    assert not (tmp_path / "run").exists()
    # the same shards as validation beside a raw training file: the hint names val_data_path, not data_path
    flags = tiny_flags(tmp_path / "run", init_from=tiny_qwen, data_path=tiny_embedded_data / "pretrain_train.jsonl",
                       val_data_path=shards, max_steps=2)
    with pytest.raises(DataError, match=rf"^{shards} was tokenized .*, or give val_data_path a raw data file"):
        run(RECIPES["pretrain"], parse_config(flags))


def test_a_saved_copy_of_the_tokenizer_made_the_shards(tiny_qwen, tiny_tokens):
    """The model's tokenizer (a copy saved with it, as AutoTokenizer loads it) made the shards of its tokenizer: the
    evaluation's perplexity was skipped for "another tokenizer", as transformers loads BPE settings the file leaves
    unset as "" instead of null."""
    from transformers import AutoTokenizer

    from mateconv.data.shards import other_vocabulary

    assert other_vocabulary(tiny_tokens / "pretrain" / "val", AutoTokenizer.from_pretrained(tiny_qwen)) is None


def test_dropout_sets_a_hugging_face_models_dropout(tiny_qwen, tiny_neox, tiny_flags, tmp_path):
    """--dropout with init_from a Qwen2 or Llama (whose config.json has attention_dropout, no dropout) was ignored
    without a word: it sets the model's dropout probabilities (GPT-NeoX's hidden_dropout too), the saved model and
    the run's config record it; not given, the model keeps its own (test_train_config: one without any is refused)."""
    import yaml

    out = tmp_path / "run"
    run(RECIPES["pretrain"], parse_config(tiny_flags(out, init_from=tiny_qwen, dropout=0.1, max_steps=2)))
    assert json.loads((out / "final" / "config.json").read_text())["attention_dropout"] == 0.1
    run_config = yaml.safe_load((out / "checkpoints" / "step_00000002" / "config.yaml").read_text())
    assert run_config["model"]["dropout"] == 0.1  # a resume builds the model with it again
    neox = build_model(parse_config(tiny_flags(out, init_from=tiny_neox, tokenizer_path=tiny_neox, vocab_size=400,
                                               dropout=0.2))).config
    assert (neox.attention_dropout, neox.hidden_dropout) == (0.2, 0.2)
    assert build_model(parse_config(tiny_flags(out, init_from=tiny_qwen))).config.attention_dropout == 0.0
    qwen = build_model(parse_config(tiny_flags(out, init_from=tiny_qwen, dropout=0.3)))
    assert qwen.model.layers[0].self_attn.attention_dropout == 0.3  # what its attention applies in training


def in_fake_hub_cache(model_dir: Path, name: str, tmp_path: Path, monkeypatch) -> Path:
    """A copy of `model_dir` as hub model `name` in a Hugging Face cache under tmp_path, read offline (as a model
    downloaded before); the working directory is tmp_path, so that `name` is no directory here. Its snapshot dir."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return snapshot


def test_a_hub_model_is_read_as_a_local_one(tiny_qwen, tiny_neox, tiny_flags, tmp_path, monkeypatch):
    """--init_from a hub id (here one in a local Hugging Face cache, offline) built the model without --dropout and
    tokenized raw data with tokenizer_path, silently (or said the model had no tokenizer.json): its config.json and
    tokenizer are read from the cache as a local model's are. A hub id that is not cached, offline, is one line that
    says nothing downloads."""
    from mateconv.train.stages import tokenizer_dir

    snapshot = in_fake_hub_cache(tiny_qwen, "tiny-org/qwen2-tiny", tmp_path, monkeypatch)
    settings = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**settings, "attention_dropout": 0.05}))
    out = tmp_path / "run"
    config = parse_config(tiny_flags(out, init_from="tiny-org/qwen2-tiny", dropout=0.3))
    assert build_model(config).model.layers[0].self_attn.attention_dropout == 0.3
    assert tokenizer_dir(config) == snapshot
    config = parse_config(["--init_from", "tiny-org/qwen2-tiny"])
    assert (config.model.dropout, config.model.max_seq_len) == (0.05, 256)  # the model's own, as from a local copy
    with pytest.raises(ConfigError, match="^tokenizer_path: .* is not the tokenizer of init_from tiny-org/qwen2-tiny"):
        parse_config(tiny_flags(out, init_from="tiny-org/qwen2-tiny", tokenizer_path=tiny_neox))
    with pytest.raises(ConfigError, match="^init_from: tiny-org/nothing is not a directory here nor in the Hugging "
                                          "Face cache, and HF_HUB_OFFLINE is set, so nothing downloads"):
        build_model(parse_config(tiny_flags(out, init_from="tiny-org/nothing")))


def test_a_hub_models_tokenizer_is_checked_for_chatml(tiny_neox, tiny_qwen, tmp_path, monkeypatch):
    """SFT from a hub id whose tokenizer has no ChatML tokens (GPT-NeoX's) adds them as from a local copy: the check
    read only a local directory's tokenizer.json, so a hub model was taken to have them."""
    from mateconv.train.models import lacks_chatml

    in_fake_hub_cache(tiny_neox, "tiny-org/neox-tiny", tmp_path, monkeypatch)
    in_fake_hub_cache(tiny_qwen, "tiny-org/qwen2-tiny", tmp_path, monkeypatch)
    assert lacks_chatml("tiny-org/neox-tiny") and lacks_chatml(tiny_neox)
    assert not lacks_chatml("tiny-org/qwen2-tiny")


def test_a_tokenizer_path_other_than_the_models_is_refused(tiny_qwen, tiny_neox, tiny_flags, tmp_path):
    """--tokenizer_path beside --init_from a model with its own tokenizer was ignored without a word (the model's
    own tokenized the data and was saved): the same tokenizer is accepted, another is refused in one line."""
    out = tmp_path / "run"
    parse_config(tiny_flags(out, init_from=tiny_qwen))  # tiny_flags names its own tokenizer: accepted
    with pytest.raises(ConfigError, match=f"^tokenizer_path: {tiny_neox} is not the tokenizer of init_from "
                                          f"{tiny_qwen} \\(400 tokens, the model's 512\\); a run from a model trains "
                                          "with the model's own tokenizer: drop --tokenizer_path"):
        parse_config(tiny_flags(out, init_from=tiny_qwen, tokenizer_path=tiny_neox))
    shuffled = json.loads((tiny_qwen / "tokenizer.json").read_text())
    vocab = shuffled["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "shuffled").mkdir()
    (tmp_path / "shuffled" / "tokenizer.json").write_text(json.dumps(shuffled))
    with pytest.raises(ConfigError, match="as many tokens as the model's, but other tokens or merges"):
        parse_config(tiny_flags(out, init_from=tiny_qwen, tokenizer_path=tmp_path / "shuffled"))


def test_rows_longer_than_a_rope_models_stated_length(tiny_qwen, tiny_flags, tmp_path, capsys):
    """A Qwen2 stating max_position_embeddings 256 (RoPE: computed positions): max_seq_len 320 trains it on longer
    rows, with a note, and the saved model states 320 (it stated 256, so chat and serve cut its context there);
    max_seq_len not given is at most 256 (the stage's 512 trained it on longer rows without a word)."""
    assert parse_config(["--init_from", str(tiny_qwen)]).model.max_seq_len == 256
    out = tmp_path / "run"
    run(RECIPES["pretrain"], parse_config(tiny_flags(out, init_from=tiny_qwen, max_seq_len=320, max_steps=1,
                                                     batch_size=2, val_data_path="")))
    assert (f"[pretrain] note: {tiny_qwen} was trained on rows of up to 256 tokens; max_seq_len 320 extends its "
            "positions (RoPE) for this run and the model it saves") in capsys.readouterr().out
    assert json.loads((out / "final" / "config.json").read_text())["max_position_embeddings"] == 320


def test_lora_on_a_model_without_the_default_target_names(tiny_neox, tiny_embedded_data, tiny_flags, tmp_path):
    """`--use_lora 1` from Pythia (GPT-NeoX: query_key_value, dense, ...) said only that no module is named q_proj,
    ...: the line now says what to give, and all-linear trains it."""
    flags = dict(init_from=tiny_neox, tokenizer_path=tiny_neox, vocab_size=400, val_data_path="", max_steps=1,
                 use_lora=True,
                 data_path=tiny_embedded_data / "pretrain_train.jsonl")
    with pytest.raises(ConfigError, match=r"\(its linear layers: dense, dense_4h_to_h, dense_h_to_4h, lm_head, "
                                          r"query_key_value\): name some with --lora_target_modules, or all-linear"):
        run(RECIPES["pretrain"], parse_config(tiny_flags(tmp_path / "lora", **flags)))
    run(RECIPES["pretrain"], parse_config(tiny_flags(tmp_path / "lora", **flags, lora_target_modules="all-linear")))
    assert (tmp_path / "lora" / "final" / "adapter").is_dir()
