"""MateConv dense model: config validation, presets, export equivalence (Llama, Qwen3; MoE models as Qwen2-MoE and
Qwen3-MoE), HF integration, save/load."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from model import PRESETS, ConfigError, MateConvConfig, MateConvForCausalLM, preset_config
from model.export import (TO_STANDARD, standard_architecture, to_llama, to_qwen2_moe, to_qwen3, to_qwen3_moe,
                          to_qwen3_next)


def tiny_config(**overrides) -> MateConvConfig:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64)
    return MateConvConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MateConvForCausalLM:
    torch.manual_seed(seed)
    model = MateConvForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial norm weights, so the export test would catch a mislabelled norm
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("fields, message", [
    (dict(dim=60, n_heads=8), "divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(use_moe=True, n_routed_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(scoring_func="sigmoid"), "unknown scoring_func"),
    (dict(n_layers=0), "n_layers"),
    (dict(dropout=1.5), "dropout"),
    (dict(flex_attention=True, dropout=0.1), "flex_attention needs flash_attn and no dropout"),
    (dict(flex_attention=True, flash_attn=False), "flex_attention needs flash_attn and no dropout"),
])
def test_config_rejects_invalid_fields(fields, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**fields)


def test_config_defaults_and_presets():
    config = MateConvConfig()
    assert (config.dim, config.n_layers, config.vocab_size, config.hidden_dim) == (512, 8, 6400, 1408)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.tie_word_embeddings and config.hidden_size == 512 and config.num_key_value_heads == 2
    expected_millions = {"mateconv-0.02b": 25.8, "mateconv-0.1b": 104.0, "mateconv-0.1b-moe": 95.1}
    assert set(PRESETS) == set(expected_millions)
    for name, millions in expected_millions.items():
        with torch.device("meta"):
            model = MateConvForCausalLM(preset_config(name))
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)
    # seed 004's MoE is MateConv-0.02B with its FFNs made experts: the same width, depth and attention
    moe_fields = {"use_moe", "n_routed_experts", "num_experts_per_tok", "n_shared_experts"}
    assert {k: v for k, v in PRESETS["mateconv-0.1b-moe"].items() if k not in moe_fields} == PRESETS["mateconv-0.02b"]
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("nope")


def test_export_to_llama_matches_logits_and_hf_generate(tmp_path):
    model = tiny_model()
    llama = to_llama(model)
    input_ids = torch.randint(3, 97, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding on one row
    with torch.no_grad():
        assert (model(input_ids).logits - llama(input_ids).logits).abs().max() < 1e-4
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = llama(input_ids, attention_mask=attention_mask).logits
    assert (ours - theirs)[:, 5:].abs().max() < 1e-4 and (ours - theirs)[1:].abs().max() < 1e-4
    from model.generation import generate_tokens

    hf = llama.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(generate_tokens(model, input_ids, 12, temperature=0, attention_mask=attention_mask), hf)
    assert torch.equal(model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False), hf)

    to_llama(model).save_pretrained(tmp_path / "llama")
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        assert (saved(input_ids).logits - llama(input_ids).logits).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="use_moe"):
        to_llama(tiny_model(use_moe=True))


def test_hidden_states_as_transformers_gives_them():
    """`output_hidden_states` (a forward's, generate's) gives Llama's tuple: each layer's input, then the normed
    output; `output_attentions` is refused in one line rather than silently answered with None."""
    model = tiny_model()
    input_ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        ours = model(input_ids, output_hidden_states=True).hidden_states
        theirs = to_llama(model)(input_ids, output_hidden_states=True).hidden_states
        assert model(input_ids).hidden_states is None
    assert len(ours) == len(theirs) == 3
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(ours, theirs))
    steps = model.generate(input_ids, max_new_tokens=3, do_sample=False, output_hidden_states=True,
                           return_dict_in_generate=True).hidden_states
    assert len(steps) == 3 and all(len(step) == 3 for step in steps) and steps[1][-1].shape == (2, 1, 64)
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(input_ids, output_attentions=True)


def test_inputs_embeds_stand_for_input_ids():
    """What prompt tuning and `generate(inputs_embeds=...)` send; without either input a one-line error."""
    model = tiny_model()
    input_ids = torch.randint(3, 97, (2, 10))
    embeds = model.get_input_embeddings()(input_ids).detach()
    with torch.no_grad():
        assert torch.allclose(model(inputs_embeds=embeds).logits, model(input_ids).logits, atol=1e-6)
    generated = model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, model.generate(input_ids, max_new_tokens=5, do_sample=False)[:, 10:])
    with pytest.raises(ValueError, match="either input_ids or inputs_embeds"):
        model(input_ids, inputs_embeds=embeds)


def test_return_dict_false_gives_a_tuple():
    """As transformers' models give it: a tuple of the fields that are set (unpacking the output object would give
    its field names instead)."""
    model = tiny_model()
    input_ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        out = model(input_ids, labels=input_ids, use_cache=False)
        loss, logits = model(input_ids, labels=input_ids, use_cache=False, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)


def test_qk_norm_exports_to_qwen3_with_the_same_logits_and_tokens():
    """qk_norm: RMSNorm over each head's queries and keys before RoPE, as Qwen3 (and MiniMind) do it; Llama has no
    such weights, so only the matching architecture takes each model."""
    model = tiny_model(qk_norm=True)
    assert {"self_attn.q_norm.weight", "self_attn.k_norm.weight"} <= {n.split(".", 3)[-1] for n, _ in
                                                                       model.named_parameters()}
    qwen3 = to_qwen3(model)
    input_ids = torch.randint(3, 97, (2, 20))
    with torch.no_grad():
        assert (model(input_ids).logits - qwen3(input_ids).logits).abs().max() < 1e-4
        assert (model(input_ids).logits - tiny_model(qk_norm=False)(input_ids).logits).abs().max() > 1e-2
    from model.generation import generate_tokens

    hf = qwen3.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(generate_tokens(model, input_ids, 12, temperature=0), hf)
    with pytest.raises(ConfigError, match="qk_norm"):
        to_llama(model)
    with pytest.raises(ConfigError, match="qk_norm=False"):
        to_qwen3(tiny_model())


@pytest.mark.parametrize("moe, architecture", [
    (dict(), "qwen2moe"),  # the default: top 2 of 4 renormalised, one shared expert
    (dict(n_shared_experts=2, norm_topk_prob=False), "qwen2moe"),  # two shared experts, as one twice as wide
    (dict(n_shared_experts=0, num_experts_per_tok=1), "qwen2moe"),  # Qwen's shared expert all zero; one pick kept as is
    (dict(qk_norm=True, n_shared_experts=0), "qwen3moe"),
    (dict(qk_norm=True), "qwen3next"),  # the MoE preset's combination: shared expert and q/k norms
])
def test_moe_exports_to_qwen_moe_with_the_same_logits_and_tokens(moe, architecture):
    """The experts stacked, Qwen's sigmoid-gated shared expert made ours (a gate of exactly 1/2, its down projection
    doubled), zero q/k/v biases (Qwen2-MoE), Qwen3-Next's gated attention and 1 + weight norms made ours: the same
    logits (padded rows too) and the same greedy tokens."""
    model = tiny_model(use_moe=True, **moe)
    assert standard_architecture(model.config) == architecture
    standard = TO_STANDARD[architecture](model)
    assert type(standard).__name__ == {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                                       "qwen3next": "Qwen3NextForCausalLM"}[architecture]
    input_ids = torch.randint(3, 97, (2, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    with torch.no_grad():
        for mask in (None, attention_mask):
            ours, theirs = model(input_ids, attention_mask=mask).logits, standard(input_ids, attention_mask=mask).logits
            assert (ours - theirs)[:, 5:].abs().max() < 1e-4
    from model.generation import generate_tokens

    hf = standard.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(generate_tokens(model, input_ids, 12, temperature=0, attention_mask=attention_mask), hf)


def test_moe_architectures_that_do_not_compute_the_model_are_refused():
    """Each exporter names what its architecture lacks or has beyond the model (Qwen2-MoE: q/k norms; Qwen3-MoE:
    shared experts; Qwen3-Next: both needed), so only the one that computes it takes it."""
    model = tiny_model(use_moe=True, qk_norm=True)
    with pytest.raises(ConfigError, match="n_shared_experts=1.*Qwen3-MoE"):
        to_qwen3_moe(model)
    with pytest.raises(ConfigError, match="qk_norm.*Qwen2-MoE"):
        to_qwen2_moe(model)
    with pytest.raises(ConfigError, match="qk_norm=False"):
        to_qwen3_moe(tiny_model(use_moe=True, n_shared_experts=0))
    with pytest.raises(ConfigError, match="qk_norm=True, n_shared_experts=0"):
        to_qwen3_next(tiny_model(use_moe=True, qk_norm=True, n_shared_experts=0))
    with pytest.raises(ConfigError, match="use_moe=False"):
        to_qwen2_moe(tiny_model())


def test_loss_uses_hf_shift_and_ignore_index():
    model = tiny_model()
    llama = to_llama(model)
    input_ids = torch.randint(3, 97, (2, 16))
    labels = input_ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        ours, theirs = model(input_ids, labels=labels), llama(input_ids, labels=labels)
    assert ours.aux_loss is None
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), abs=1e-5)


def test_math_attention_fallback_matches_sdpa():
    sdpa, math_model = tiny_model(flash_attn=True), tiny_model(flash_attn=False)
    input_ids = torch.randint(3, 97, (2, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :7] = 0
    with torch.no_grad():
        for mask in (None, attention_mask):
            diff = sdpa(input_ids, attention_mask=mask).logits - math_model(input_ids, attention_mask=mask).logits
            assert diff.abs().max() < 1e-5


def test_right_padding_leaves_real_tokens_unchanged():
    model = tiny_model()
    input_ids = torch.randint(3, 97, (1, 12))
    padded = torch.cat([input_ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        diff = model(padded, attention_mask=mask).logits[:, :12] - model(input_ids).logits
    assert diff.abs().max() < 1e-5


def test_save_load_roundtrip_with_auto_classes(tmp_path):
    model = tiny_model(use_moe=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "mateconv"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MateConvForCausalLM) and loaded.config.use_moe
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    input_ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_gradient_checkpointing_gives_same_gradients():
    from mateconv.train.models import enable_activation_checkpointing

    input_ids = torch.randint(3, 97, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=1, use_moe=True).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        output = model(input_ids, labels=input_ids)
        output.loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        assert output.aux_loss.requires_grad
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    input_ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, model(input_ids).logits)
        model.train()
        assert not torch.equal(model(input_ids).logits, model(input_ids).logits)


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        tiny_model()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("flash_attn", [True, False])
def test_packed_documents_attend_only_to_themselves(flash_attn):
    """A row packed with three documents (position ids restarting at each one's EOS) gives every document the
    logits it gets alone, [EOS] + document; with the mask off, the later documents see the earlier ones."""
    model, eos = tiny_model(flash_attn=flash_attn), 2
    documents = [torch.randint(3, 97, (n,)) for n in (9, 14, 6)]
    pieces = [torch.cat([torch.tensor([eos]), doc]) for doc in documents]
    row = torch.cat(pieces)[None]
    positions = torch.cat([torch.arange(len(piece)) for piece in pieces])[None]
    with torch.no_grad():
        packed = model(row, position_ids=positions).logits[0]
        alone = torch.cat([model(piece[None]).logits[0] for piece in pieces])
        assert torch.allclose(packed, alone, atol=1e-5)
        model.config.document_mask = False  # the stage then passes no position ids (mateconv.logprobs.lm_inputs)
        from mateconv.logprobs import lm_inputs
        assert "position_ids" not in lm_inputs(model, {"input_ids": row, "position_ids": positions})
        crossing = model(row).logits[0]
    assert torch.allclose(crossing[: len(pieces[0])], alone[: len(pieces[0])], atol=1e-5)
    assert not torch.allclose(crossing[len(pieces[0]):], alone[len(pieces[0]):], atol=1e-3)


@pytest.mark.parametrize("use_moe", [False, True])
def test_flex_attention_masks_packed_documents_like_the_boolean_mask(monkeypatch, use_moe):
    """flex_attention: compiled, the packed rows' document mask runs as a FlexAttention BlockMask (inductor's kernel,
    compiled for real here) with the logits of SDPA's boolean mask; eager models keep SDPA. Its backward exists on
    CUDA only, so there alone the model picks it (`flex_attention_runs`); here it is let run for a no-grad forward.
    Documents of every length, rows not a multiple of the 128-token block."""
    import model.modeling as modeling

    built = []
    documents_mask = modeling.packed_documents_mask
    monkeypatch.setattr(modeling, "packed_documents_mask",
                        lambda positions, flex=False: built.append(flex) or documents_mask(positions, flex))
    moe = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, moe_impl="loop") if use_moe else {}
    reference, flexible = (tiny_model(max_seq_len=160, flex_attention=flex, **moe) for flex in (False, True))
    ids = torch.randint(3, 97, (3, 150))
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths])
                             for lengths in ([40, 110], [150], [1, 9, 20, 30, 90])])
    with torch.no_grad():
        expected = reference(ids, position_ids=positions).logits
        assert torch.equal(flexible(ids, position_ids=positions).logits, expected) and built == [False, False]
        flexible.compile()
        assert torch.allclose(flexible(ids, position_ids=positions).logits, expected, atol=1e-5)
        assert built[-1] is False  # compiled on CPU: not picked
        monkeypatch.setattr(modeling, "flex_attention_runs", lambda device: torch.compiler.is_compiling())
        torch.compiler.reset()
        logits = flexible(ids, position_ids=positions).logits
    assert built[-1] is True, built
    assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("case", ["dense packed", "sft rows", "qk_norm packed", "flex packed", "moe bf16 packed"])
def test_training_forward_compiles_to_one_graph(monkeypatch, case):
    """What the engine compiles on CUDA (`model.compile()`): the forward with labels up to the loss, in one graph.
    A graph break (a `.item()`, a Python branch on a tensor) would cut the step into pieces with a host round trip
    between them, which costs GPU time and no CPU test would otherwise notice. The batches are the engine's: packed
    rows with position ids, SFT rows (right padding, no attention mask, prompt and padding unlabelled). The MoE case
    runs as on the GPU, under bf16 autocast, where the experts are grouped GEMMs (in fp32 on CPU they loop, with
    breaks: the CPU-only path)."""
    import model.modeling as modeling

    overrides = {"qk_norm packed": dict(qk_norm=True), "flex packed": dict(flex_attention=True, max_seq_len=160),
                 "moe bf16 packed": dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2)}.get(case, {})
    if case == "flex packed":  # the CUDA rule, let run on CPU, without gradients: its backward exists on CUDA only
        monkeypatch.setattr(modeling, "flex_attention_runs", lambda device: torch.compiler.is_compiling())
    model = tiny_model(**overrides).train()
    ids = torch.randint(3, 97, (2, 48))
    if case == "sft rows":
        labels = ids.index_fill(1, torch.cat([torch.arange(8), torch.arange(40, 48)]), -100)
        inputs = dict(input_ids=ids.index_fill(1, torch.arange(40, 48), 0), labels=labels)
    else:
        positions = torch.cat([torch.arange(30), torch.arange(18)]).expand(2, -1)  # two documents per row
        inputs = dict(input_ids=ids, labels=ids, position_ids=positions)
    dtype = torch.bfloat16 if case.startswith("moe") else torch.float32
    torch.compiler.reset()
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with autocast, torch.set_grad_enabled(case != "flex packed"):
        explained = torch._dynamo.explain(model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
