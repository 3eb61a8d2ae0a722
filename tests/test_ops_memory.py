"""Memory estimator against the real model (parameter count, saved activations), and the presets against budgets."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mateconv.memory import (GIB, SAFETY, PresetError, TrainingSetup, count_parameters, estimate, head_saved_bytes,
                             layer_activation_bytes, load_presets, preset_flags, setup_for)
from model.config import PRESETS, MateConvConfig, preset_config
from model.modeling import MateConvForCausalLM

REPO = Path(__file__).resolve().parents[1]
PRESET_FILES = sorted((REPO / "configs" / "memory").glob("gpu*gb.yaml"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_the_model(name):
    with torch.device("meta"):
        model = MateConvForCausalLM(preset_config(name))
    assert count_parameters(model.config) == sum(p.numel() for p in model.parameters())


def _saved_bytes(model: MateConvForCausalLM, batch: int, seq: int) -> int:
    """Bytes of distinct non-parameter storages autograd saves for backward in one training step."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, labels=ids).loss.backward()
    return sum(saved.values())


def _saved_bytes_per_token(config: MateConvConfig, dtype: torch.dtype, checkpointing: bool, seq: int = 32) -> float:
    """Saved bytes per token: the slope between batch 2 and batch 4, so that token-independent saved tensors
    (e.g. a fused weight copy) drop out."""
    torch.manual_seed(0)
    model = MateConvForCausalLM(config).to(dtype).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    return (_saved_bytes(model, 4, seq) - _saved_bytes(model, 2, seq)) / (2 * seq)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["", "qk_norm"])
def test_saved_activations_match_the_estimate(use_moe, dtype, checkpointing, qk_norm):
    config = MateConvConfig(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=128,
                            use_moe=use_moe, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                            qk_norm=qk_norm)
    act = 4 if dtype == torch.float32 else 2
    measured = _saved_bytes_per_token(config, dtype, checkpointing)
    # checkpointing keeps each layer's input (the layer rebuilt in backward saves under checkpoint's own hooks)
    layers = config.n_layers * (act * config.dim if checkpointing else layer_activation_bytes(config, act))
    estimated = layers + head_saved_bytes(config, act)
    assert estimated == pytest.approx(measured, rel=0.12)


def test_zero_partitioning_and_offload_arithmetic():
    config = preset_config("mateconv-0.1b-moe")
    params = count_parameters(config)
    base = TrainingSetup(batch_size=1, max_seq_len=16)
    plain = estimate(config, base)
    assert (plain["weights"], plain["gradients"], plain["optimizer_states"]) == (2 * params, 2 * params, 12 * params)
    zero2 = estimate(config, TrainingSetup(batch_size=1, max_seq_len=16, zero_stage=2, num_gpus=2))
    assert (zero2["weights"], zero2["gradients"], zero2["optimizer_states"]) == (2 * params, params, 6 * params)
    zero3 = estimate(config, TrainingSetup(batch_size=1, max_seq_len=16, zero_stage=3, num_gpus=4))
    assert zero3["weights"] == params / 2 and zero3["optimizer_states"] == 3 * params
    offload = estimate(config, TrainingSetup(batch_size=1, max_seq_len=16, zero_stage=2, offload_optimizer=True))
    assert offload["optimizer_states"] == 0
    double = estimate(config, TrainingSetup(batch_size=2, max_seq_len=16))
    assert double["activations"] == pytest.approx(2 * plain["activations"])


def test_presets_fit_their_cards_with_margin_and_grow_with_the_card():
    assert [p.name for p in PRESET_FILES] == ["gpu16gb.yaml", "gpu24gb.yaml", "gpu40gb.yaml", "gpu80gb.yaml"]
    tokens = {}
    for path in PRESET_FILES:
        data = load_presets(path)
        card = data["gpu_memory_gb"] * GIB
        assert set(data["models"]) == {"mateconv-0.02b", "mateconv-0.1b-moe"}
        for model_name, stages in data["models"].items():
            assert set(stages) == {"pretrain", "sft", "dpo"}
            for stage in stages:
                setup = setup_for(data, model_name, stage)
                config = preset_config(model_name, max_seq_len=setup.max_seq_len)
                share = estimate(config, setup)["total"] / card
                assert 0.3 < share <= SAFETY, f"{path.name} {model_name}/{stage} uses {share:.0%} of the card"
                tokens.setdefault((model_name, stage), []).append(
                    setup.batch_size * setup.max_seq_len * setup.sequences_per_example)
    for key, per_card in tokens.items():
        assert per_card == sorted(per_card), f"{key}: a larger card should not hold fewer tokens per micro batch"


def test_preset_file_errors_and_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu_memory_gb: 16\nmodels:\n  mateconv-0.02b:\n    pretrain: {batch_sise: 4, max_seq_len: 8}\n")
    with pytest.raises(PresetError, match=r"unknown keys \['batch_sise'\]"):
        load_presets(bad)
    bad.write_text("gpu_memory_gb: 16\nmodels:\n  mateconv-0.02b:\n    pretrain: {batch_size: 4, max_seq_len: 8}\n"
                   "    pretrain: {batch_size: 8, max_seq_len: 8}\n")  # PyYAML kept the second silently
    with pytest.raises(PresetError, match=f"^{bad}:5: not valid YAML: key 'pretrain' is given twice"):
        load_presets(bad)
    flags = preset_flags(load_presets(PRESET_FILES[0]), "mateconv-0.1b-moe", "pretrain")
    assert flags[:2] == ["--preset", "mateconv-0.1b-moe"]
    assert flags[flags.index("--batch_size") + 1] == "32"
    result = subprocess.run([sys.executable, "-m", "mateconv.memory", str(PRESET_FILES[0]), "--flags",
                             "mateconv-0.3b", "pretrain"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "has no entry mateconv-0.3b/pretrain" in \
        result.stderr


def test_preset_flags_are_stage_flags():
    from mateconv.config import parse_config

    for path in PRESET_FILES:
        data = load_presets(path)
        for model_name, stages in data["models"].items():
            for stage, settings in stages.items():
                parsed = parse_config(preset_flags(data, model_name, stage))
                for key, value in {**PRESETS[model_name], **settings}.items():
                    assert parsed.get(key) == value, (path.name, model_name, stage, key)
