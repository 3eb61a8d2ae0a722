"""`python -m mateconv.export` on a trained tiny model: the Llama directory and the GGUF file decode the same
greedy tokens as our own decoder (GGUF through llama.cpp itself, via llama-cpp-python); Mixture-of-Experts models as
Qwen2-MoE, Qwen3-MoE or Qwen3-Next, and exports that would compute another function refused in one line."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys

import gguf
import jinja2
import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from mateconv.chat import load_model
from mateconv.export import ExportError, add_tokenizer, llama_cpp_split, ollama_note
from mateconv.export import main as export_main
from mateconv.tokenizer import adopt_tokenizer, corpus_texts
from model import MateConvConfig, MateConvForCausalLM
from model.generation import generate_tokens

QUESTIONS = ["Which is larger, 14 or 6?", "12 千克等于多少克？"]
NEW_TOKENS = 12


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mateconv.export", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tiny_sft_model):
    return greedy_reference(tiny_sft_model)


def greedy_reference(model_dir) -> list[tuple[list[int], list[int]]]:
    """[(prompt ids, our greedy continuation up to and including EOS)] for each question."""
    model, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
    cases = []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        out = generate_tokens(model, torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, temperature=0,
                              eos_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
        cases.append((list(prompt), out))
    return cases


def test_llama_directory(tiny_sft_model, reference, tmp_path):
    result = export(tiny_sft_model, "--to", "llama", "--out", tmp_path / "llama")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""  # no progress bars of loading and saving the model
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    for prompt, ours in reference:
        out = llama.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert out[0, len(prompt):].tolist() == ours
    assert GenerationConfig.from_pretrained(tmp_path / "llama").do_sample is True  # servers sample by default
    messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "The answer is 14."}]
    plain = jinja2.Environment().from_string(tokenizer.chat_template).render(messages=messages,
                                                                             add_generation_prompt=False)
    assert plain == tokenizer.apply_chat_template(messages, tokenize=False) and "generation" not in plain
    for saved in (tiny_sft_model, tmp_path / "llama"):  # transformers 4 refuses 5's TokenizersBackend
        config = json.loads((saved / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"]


def untrained_moe(tiny_tokenizer, out, **moe):
    """A randomly initialised MoE model (dim 64, 2 layers, 4 experts, top 2) saved with the tiny tokenizer, its router
    sharpened so that its picks are decided (near-uniform scores would make any rounding flip them)."""
    torch.manual_seed(0)
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=96, use_moe=True,
                  n_routed_experts=4, num_experts_per_tok=2)
    config = MateConvConfig(**{**fields, **moe})
    model = MateConvForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(out)
    return model


def assert_refused(model, to: str, out, *phrases: str) -> None:
    """`python -m mateconv.export MODEL --to TO --out OUT` stops with one line holding `phrases` and writes nothing
    (run in this process: an unexpected exception fails the test as a traceback would)."""
    with pytest.raises(SystemExit) as stopped:
        export_main([str(model), "--to", to, "--out", str(out)])
    line = str(stopped.value.code)
    assert line.startswith("export: ") and "\n" not in line and all(phrase in line for phrase in phrases), line
    assert not out.exists()


def test_a_hugging_face_model_is_refused_with_the_next_command(tmp_path):
    """A model trained from a Hugging Face --init_from is one of its own class: `--to gguf` names llama.cpp's
    converter with this export's paths and dtype (it said only "already in a standard format"), `--to llama` says
    the directory is loaded as it is."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "sft final")
    source, gguf_dir = tmp_path / "sft final", tmp_path / "gguf"
    with pytest.raises(SystemExit) as stopped:
        export_main([str(source), "--to", "gguf", "--dtype", "q8_0", "--out", str(gguf_dir)])
    line = str(stopped.value.code)
    assert "\n" not in line and "Qwen2ForCausalLM, not a MateConv model" in line, line
    assert (f"mkdir -p {gguf_dir} && python convert_hf_to_gguf.py '{source}' --outfile {gguf_dir}/model-q8_0.gguf "
            "--outtype q8_0 (") in line, line
    assert not gguf_dir.exists()
    assert_refused(source, "llama", tmp_path / "llama", "needs no export", "load the directory as it is")


def test_a_model_whose_tokenizer_has_no_chat_template_exports(tiny_tokenizer, tmp_path):
    """A base model for text completion (lm-eval, llama.cpp) needs no chat template: a tokenizer brought without one
    (was refused: "has no chat template") exports to transformers and GGUF, with none."""
    torch.manual_seed(0)
    model = MateConvForCausalLM(MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                               max_seq_len=96)).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "model")
    assert export_main([str(tmp_path / "model"), "--to", "llama", "--out", str(tmp_path / "llama")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "llama").chat_template is None
    standard = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        assert (model(ids).logits - standard(ids).logits).abs().max() < 1e-4
    assert export_main([str(tmp_path / "model"), "--to", "gguf", "--out", str(tmp_path / "gguf")]) == 0
    assert "tokenizer.chat_template" not in GGUFReader(tmp_path / "gguf" / "model-f16.gguf").fields


def test_moe_exports_that_would_compute_another_function_are_refused_in_one_line(tiny_moe_sft_model, tiny_tokenizer,
                                                                                 tmp_path):
    """Each asked-for Hugging Face architecture that does not fit names the one that does."""
    both = tmp_path / "shared_and_qk_norm"
    untrained_moe(tiny_tokenizer, both, qk_norm=True, n_shared_experts=1)
    for to in ("qwen2moe", "qwen3moe"):
        assert_refused(both, to, tmp_path / to, "(--to qwen3next)")
    for to in ("qwen3moe", "qwen3next", "llama", "qwen3"):
        assert_refused(tiny_moe_sft_model, to, tmp_path / to, "(--to qwen2moe)")


def test_shared_experts_with_qk_norm_as_qwen3_next(tiny_tokenizer, tmp_path):
    """The MoE preset's combination (shared expert and per-head q/k norms) as a Qwen3-Next of full-attention layers,
    loaded without remote code: our logits and greedy tokens."""
    model = untrained_moe(tiny_tokenizer, tmp_path / "model", qk_norm=True, n_shared_experts=1)
    result = export(tmp_path / "model", "--to", "qwen3next", "--out", tmp_path / "qwen3next")
    assert result.returncode == 0, result.stderr[-2000:]
    standard = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3next").eval()
    assert type(standard).__name__ == "Qwen3NextForCausalLM"
    assert set(standard.config.layer_types) == {"full_attention"}
    ids = torch.tensor([list(range(3, 60))])
    with torch.no_grad():
        assert (model(ids).logits - standard(ids).logits).abs().max() < 1e-4
    ours = generate_tokens(model, ids, max_new_tokens=NEW_TOKENS, temperature=0)
    assert torch.equal(standard.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), ours)
    # a reader of the layout before transformers 5 (no rope_parameters): its default rotary share is 0.25
    path = tmp_path / "qwen3next" / "config.json"
    config = json.loads(path.read_text())
    del config["rope_parameters"]
    path.write_text(json.dumps(config))
    older = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3next").eval()
    with torch.no_grad():
        assert (model(ids).logits - older(ids).logits).abs().max() < 1e-4


def logits_of(model_dir, standard, reference) -> float:
    """Largest difference between our logits and `standard`'s over the reference prompts and continuations."""
    ours, _ = load_model(model_dir, device="cpu", dtype="float32")
    worst = 0.0
    with torch.no_grad():
        for prompt, reply in reference:
            ids = torch.tensor([prompt + reply])
            worst = max(worst, (ours(ids).logits - standard(ids).logits).abs().max().item())
    return worst


@pytest.mark.parametrize("fixture, architecture", [("tiny_moe_sft_model", "qwen2moe"),
                                                   ("tiny_moe_qk_norm_sft_model", "qwen3moe")])
def test_moe_directory_in_transformers_without_remote_code(request, fixture, architecture, tmp_path):
    """A trained MoE model as a standard transformers model (no model code beside it): our logits, our greedy
    tokens."""
    model_dir = request.getfixturevalue(fixture)
    reference = greedy_reference(model_dir)
    result = export(model_dir, "--to", architecture, "--out", tmp_path / architecture)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / architecture / "config.json").read_text())
    assert "auto_map" not in config and not list((tmp_path / architecture).glob("*.py"))
    standard = AutoModelForCausalLM.from_pretrained(tmp_path / architecture).eval()
    assert type(standard).__name__ == {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}[
        architecture]
    assert logits_of(model_dir, standard, reference) < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / architecture)
    for prompt, ours in reference:
        out = standard.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_moe_gguf_in_llama_cpp(tiny_moe_qk_norm_sft_model, tmp_path, dtype):
    """Qwen3-MoE (q/k norms, top-k renormalised, no shared experts) in llama.cpp: our greedy tokens."""
    reference = greedy_reference(tiny_moe_qk_norm_sft_model)
    llm = gguf_generates_our_tokens(tiny_moe_qk_norm_sft_model, reference, tmp_path, dtype)
    assert llm.metadata["general.architecture"] == "qwen3moe"
    assert (int(llm.metadata["qwen3moe.expert_count"]), int(llm.metadata["qwen3moe.expert_used_count"])) == (4, 2)


@pytest.mark.parametrize("moe, architecture", [
    (dict(n_shared_experts=2, norm_topk_prob=False), "qwen2moe"), (dict(num_experts_per_tok=1), "qwen2moe"),
    # renormalised top-k weights, which llama.cpp's qwen2moe never has (the default MoE model)
    (dict(), "bailingmoe"), (dict(n_shared_experts=0), "bailingmoe"),
    # the MoE preset's combination, renormalised or not; q/k norms without renormalising (qwen3moe always does)
    (dict(qk_norm=True, n_shared_experts=1), "dots1"), (dict(qk_norm=True, n_shared_experts=2, norm_topk_prob=False),
                                                        "dots1"), (dict(qk_norm=True, n_shared_experts=0, norm_topk_prob=False), "dots1")])
def test_moe_gguf_logits_in_llama_cpp(tiny_tokenizer, tmp_path, moe, architecture):
    """Every MoE model has a GGUF that llama.cpp computes as we do: Qwen2-MoE's gated shared expert (where the gate's
    sigmoid is silu(z)/z, NaN for a zero gate) where the top-k weights are not renormalised, else bailingmoe; with
    per-head q/k norms dots1 (llama.cpp's Qwen3-Next needs linear-attention layers), both with plain shared
    experts and the renormalisation read from the file: our logits."""
    model = untrained_moe(tiny_tokenizer, tmp_path / "model", **moe)
    result = export(tmp_path / "model", "--to", "gguf", "--dtype", "f32", "--out", tmp_path / "gguf")
    assert result.returncode == 0, result.stderr[-2000:]
    llm = Llama(model_path=str(tmp_path / "gguf" / "model-f32.gguf"), n_ctx=96, n_threads=1, logits_all=True,
                verbose=False)
    assert llm.metadata["general.architecture"] == architecture
    ids = list(range(3, 60))
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_in_llama_cpp(tiny_sft_model, reference, tmp_path, dtype):
    llm = gguf_generates_our_tokens(tiny_sft_model, reference, tmp_path, dtype)
    metadata = llm.metadata
    assert metadata["tokenizer.ggml.pre"] == "qwen2" and int(metadata["llama.context_length"]) == 96
    template = metadata["tokenizer.chat_template"]  # the one llama.cpp applies: plain Jinja, no generation markers
    assert "<|im_start|>" in template and "endgeneration" not in template and "{% generation" not in template


def test_qk_norm_model_exports_as_qwen3(tiny_qk_norm_sft_model, tmp_path):
    """Per-head q/k norms (MiniMind's and Qwen3's attention): a Qwen3 directory and a Qwen3 GGUF that generate our
    greedy tokens; asked for Llama, which has no such norms, the export says so in one line."""
    reference = greedy_reference(tiny_qk_norm_sft_model)
    refused = export(tiny_qk_norm_sft_model, "--to", "llama", "--out", tmp_path / "llama")
    assert refused.returncode != 0 and not (tmp_path / "llama").exists() and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("export: ") and "--to qwen3" in refused.stderr
    result = export(tiny_qk_norm_sft_model, "--to", "qwen3", "--out", tmp_path / "qwen3")
    assert result.returncode == 0, result.stderr[-2000:]
    qwen3 = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3").eval()
    assert type(qwen3).__name__ == "Qwen3ForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "qwen3")
    for prompt, ours in reference:
        out = qwen3.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert out[0, len(prompt):].tolist() == ours
    llm = gguf_generates_our_tokens(tiny_qk_norm_sft_model, reference, tmp_path, "f32")
    # ollama runs Qwen3 on its own engine, which splits text as Qwen2 does whatever the file says: ours must too
    assert llm.metadata["general.architecture"] == "qwen3" and llm.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert "note:" not in export(tiny_qk_norm_sft_model, "--to", "gguf", "--out", tmp_path / "gguf").stderr


def gguf_generates_our_tokens(model_dir, reference, tmp_path, dtype: str) -> Llama:
    """Exports `model_dir` to GGUF and checks llama.cpp's tokens and greedy replies against ours; the loaded model."""
    result = export(model_dir, "--to", "gguf", "--dtype", dtype, "--out", tmp_path / "gguf")
    assert result.returncode == 0, result.stderr[-2000:]
    path = tmp_path / "gguf" / f"model-{dtype}.gguf"
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    for question, (prompt, ours) in zip(QUESTIONS, reference):
        text = tokenizer.decode(prompt)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
        llm.reset()
        theirs = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(int(token))
            if token == eos or len(theirs) == NEW_TOKENS:
                break
        if dtype == "q8_0":  # 8-bit weights: the first tokens must agree, later ones may drift
            assert theirs[:3] == ours[:3], (question, theirs, ours)
        else:
            assert theirs == ours, (question, theirs, ours)
    return llm


def test_a_training_checkpoint_exports_like_the_final_model(tiny_sft_model, tmp_path):
    """A run stopped before its end has checkpoints but no final/: export said "no model at ... (expected a
    save_pretrained directory with config.json)". A checkpoint is consolidated once into <checkpoint>/model/; the
    run's last checkpoint exports to the same GGUF model as its final/ (named after the directory above it)."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000300"
    shutil.copytree(tiny_sft_model.parent / "checkpoints" / checkpoint.name, checkpoint)
    for source, out in ((checkpoint, tmp_path / "from_checkpoint"), (tiny_sft_model, tmp_path / "from_final")):
        result = export(source, "--to", "gguf", "--dtype", "f32", "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
    ours, final = (GGUFReader(tmp_path / name / "model-f32.gguf") for name in ("from_checkpoint", "from_final"))
    assert [t.name for t in ours.tensors] == [t.name for t in final.tensors]
    assert all((a.data == b.data).all() for a, b in zip(ours.tensors, final.tensors))
    assert {k: f.contents() for k, f in ours.fields.items() if k != "general.name"} == {
        k: f.contents() for k, f in final.fields.items() if k != "general.name"}
    assert (checkpoint / "model" / "config.json").is_file()


def test_a_moe_training_checkpoint_exports_like_the_final_model(tiny_moe_sft_model, tmp_path):
    """An MoE run's last checkpoint exports to the same Qwen2-MoE weights as its final/."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000300"
    shutil.copytree(tiny_moe_sft_model.parent / "checkpoints" / checkpoint.name, checkpoint)
    for source, out in ((checkpoint, tmp_path / "from_checkpoint"), (tiny_moe_sft_model, tmp_path / "from_final")):
        result = export(source, "--to", "qwen2moe", "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
    ours, final = (load_file(tmp_path / name / "model.safetensors") for name in ("from_checkpoint", "from_final"))
    assert ours.keys() == final.keys() and "model.layers.0.mlp.experts.3.down_proj.weight" in ours
    assert all(torch.equal(ours[name], final[name]) for name in ours)


def test_exports_keep_what_they_did_not_write(tiny_sft_model, tmp_path):
    """An export writes only its own files: GGUF files of two dtypes, an ollama Modelfile and a Llama export sit side
    by side (before, each export replaced the whole --out directory: `--out out` deleted every checkpoint). A Llama
    export replaces only a new, empty or earlier export's directory, never the source; its config.json names
    rope_theta at the top level too (readers of the pre-transformers-5 layout)."""
    from mateconv.export import main as export_main

    out = tmp_path / "export"
    assert export_main([str(tiny_sft_model), "--to", "llama", "--out", str(out / "llama")]) == 0
    (out / "Modelfile").write_text("FROM ./model-f16.gguf\n")
    for dtype in ("f16", "q8_0"):
        assert export_main([str(tiny_sft_model), "--to", "gguf", "--dtype", dtype, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "llama", "model-f16.gguf", "model-q8_0.gguf"]
    assert export_main([str(tiny_sft_model), "--to", "llama", "--out", str(out / "llama")]) == 0  # replaced
    config = json.loads((out / "llama" / "config.json").read_text())
    assert config["rope_theta"] == json.loads((tiny_sft_model / "config.json").read_text())["rope_theta"]
    for target, problem in ((out, "holds files an export did not write"), (tiny_sft_model, "is the source model")):
        with pytest.raises(SystemExit, match=rf"^export: --out .* {problem}"):
            export_main([str(tiny_sft_model), "--to", "llama", "--out", str(target)])
    assert (out / "Modelfile").is_file() and (tiny_sft_model / "model.safetensors").is_file()


def test_an_out_that_is_a_file_is_refused_and_kept(tiny_sft_model, tmp_path):
    """--out naming a file: refused in one line, the file as it was (a Llama export moved it aside to a hidden
    .old, put the export in its place and then failed on removing it)."""
    from mateconv.export import main as export_main

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"^export: --out .*notes.txt is a file"):
        export_main([str(tiny_sft_model), "--to", "llama", "--out", str(tmp_path / "notes.txt")])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_weights_file_cut_short_is_one_line(tiny_sft_model, tmp_path):
    """A model whose model.safetensors was cut short (an interrupted copy): one line, not safetensors' traceback."""
    from mateconv.export import main as export_main

    source = tmp_path / "model"
    shutil.copytree(tiny_sft_model, source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    with pytest.raises(SystemExit, match=r"^export: cannot load model/tokenizer from .*model: .*incomplete metadata"):
        export_main([str(source), "--to", "gguf", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("to", ["llama", "gguf"])
def test_an_out_that_cannot_be_made_is_one_line(tiny_sft_model, tmp_path, to):
    """--out under a file (or on a full or read-only disk): the OS's reason in one line, not a traceback."""
    from mateconv.export import main as export_main

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SystemExit, match=r"^export: cannot write --out .*file/out: Not a directory$"):
        export_main([str(tiny_sft_model), "--to", to, "--out", str(tmp_path / "file" / "out")])


TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog; it's 3.14 o'clock. I'm sure they'll've DONE'S",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。请问12千克等于多少克？",
    "1234567890 3.14159265358979 2024年12月5日 ６７８ ٣٤٥ 1,000,000",
    "Party time 🎉🥳 — naïve café 👩‍💻 ✅ 🇨🇳",
    "a  b   c    d\t\te\n\n\nf \n g   \n\n  ", "line1\r\nline2\r\n", "a\u00a0b\u3000c\u2009d",
    "def area(r: float) -> float:\n\treturn 3.14159 * r ** 2  # 面积\n\nprint({'k': [1, 2]})\n    if x:\n        pass\n",
    "Hello世界123abc，English和中文mixed！Привет мир αβγ こんにちは 한국어",
    "<|im_start|>user\n你好 <think>x</think><|im_end|>\n<|im_start|>assistant\n",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, 12 + 7?"},
        {"role": "assistant", "content": "19 😀"}, {"role": "user", "content": "Thanks!\n\tBye"}]


def vocab_only_llama(tokenizer, path) -> Llama:
    """llama.cpp holding only what a GGUF export writes for the tokenizer (no weights, so it loads at once)."""
    writer = gguf.GGUFWriter(path, "llama")
    add_tokenizer(writer, tokenizer, len(tokenizer), tokenizer.bos_token_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_a_tokenizer_without_pad_token_exports_to_gguf(tiny_tokenizer, tmp_path):
    """A tokenizer with no pad token (llama.cpp needs none) is written without one (it was a struct.error)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tokenizer.pad_token = None
    llm = vocab_only_llama(tokenizer, tmp_path / "vocab.gguf")
    assert llm.token_eos() == tokenizer.eos_token_id and "tokenizer.ggml.padding_token_id" not in llm.metadata


def llama_cpp_chatml(llm: Llama, messages: list[dict[str, str]]) -> str:
    """The prompt llama.cpp's own chat formatting (llama-server without --jinja) builds from the GGUF's template."""
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buffer = ctypes.create_string_buffer(4096)
    length = llama_cpp.llama_chat_apply_template(llm.metadata["tokenizer.chat_template"].encode(), chat,
                                                 len(messages), True, buffer, len(buffer))
    return buffer.raw[:length].decode()


@pytest.mark.parametrize("which", ["ours", "minimind"])
def test_llama_cpp_tokenizes_and_formats_chats_as_we_do(which, tiny_tokenizer, shared_data, tmp_path):
    """llama.cpp tokenizes with its own code, chosen by the GGUF's tokenizer metadata: for our tokenizer (Qwen2's
    split) and for MiniMind's through --tokenizer (GPT-2's, as every tokenizer trained before), it gives our ids on
    varied and real text, decodes each token to the same bytes (UTF-8 split across tokens included), and its own
    ChatML formatting and llama-cpp-python's template path give our chat-template prompt ids."""
    if which == "ours":
        source = tiny_tokenizer
    else:
        source = adopt_tokenizer(shared_data("jingyaogong__minimind/model"), tmp_path / "minimind")
    tokenizer = AutoTokenizer.from_pretrained(source)
    llm = vocab_only_llama(tokenizer, tmp_path / "vocab.gguf")
    assert llm.metadata["tokenizer.ggml.pre"] == {"ours": "qwen2", "minimind": "gpt-2"}[which]
    real = list(corpus_texts([shared_data("hiyouga__LLaMA-Factory/data/alpaca_zh_demo.json"),
                              shared_data("hiyouga__LLaMA-Factory/data/wiki_demo.first3lines.txt")], 60_000,
                             normalization="none"))  # the raw text, full-width punctuation too
    for text in TOKENIZER_TEXTS + real:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert b"".join(llm.detokenize([i], special=True) for i in ids) == text.encode()
    ours = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert llm.tokenize(llama_cpp_chatml(llm, CHAT).encode(), add_bos=True, special=True) == ours  # no BOS added
    formatted = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=tokenizer.eos_token,
                                    bos_token=tokenizer.bos_token)(messages=CHAT)
    assert llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True) == ours
    assert (llm.token_bos(), llm.token_eos()) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    # a reply shown without its special tokens reads the same in both
    assert llm.detokenize(ours, special=False) == tokenizer.decode(ours, skip_special_tokens=True).encode()


def test_tokenizers_llama_cpp_would_split_otherwise_are_refused(tiny_tokenizer):
    """A normalizer (llama.cpp applies none) or a pre-tokenizer that is neither ours nor GPT-2's would make llama.cpp
    see other ids than training: one line each (before, any ByteLevel pre-tokenizer was declared "gpt-2")."""
    spec = json.loads(AutoTokenizer.from_pretrained(tiny_tokenizer).backend_tokenizer.to_str())
    assert llama_cpp_split(spec) == "qwen2"
    with pytest.raises(ExportError, match=r"normalizes text first \(NFC\), which llama.cpp does not"):
        llama_cpp_split({**spec, "normalizer": {"type": "NFC"}})
    for other in ({"type": "Whitespace"}, {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}):
        with pytest.raises(ExportError, match="neither GPT-2's nor MateConv's split"):
            llama_cpp_split({**spec, "pre_tokenizer": other})
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert llama_cpp_split({**spec, "pre_tokenizer": gpt2}) == "gpt-2"


def test_ollama_note_for_qwen3_with_gpt2_split():
    """ollama's engine splits Qwen3 models' text as Qwen2 does: a Qwen3 export of a GPT-2-split tokenizer (trained
    before, or MiniMind's) is right in llama.cpp but not in ollama, and the export says so."""
    assert "ollama" in ollama_note(gguf.MODEL_ARCH.QWEN3, "gpt-2")
    assert ollama_note(gguf.MODEL_ARCH.QWEN3, "qwen2") is None and ollama_note(gguf.MODEL_ARCH.LLAMA, "gpt-2") is None
