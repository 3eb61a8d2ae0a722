"""A trained checkpoint is self-contained: `from_pretrained(dir, trust_remote_code=True)` works in a fresh process
started elsewhere, with this project's packages impossible to import, and decodes the same tokens as here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from mateconv.chat import load_model
from model.generation import generate_tokens

PROMPT = [{"role": "user", "content": "Which is larger, 14 or 6?"}]
OUTSIDE = """
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("model", "mateconv"):
            raise ImportError(f"{name} is blocked: the checkpoint must not need this project")

sys.meta_path.insert(0, Blocked())
from transformers import AutoModelForCausalLM, AutoTokenizer

path, prompt = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "use_moe": model.config.use_moe,
                  "tokens": out[0].tolist()}))
"""


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_checkpoint_loads_outside_the_repo(kind, tiny_sft_model, tiny_moe_sft_model, tmp_path):
    source = tiny_sft_model if kind == "dense" else tiny_moe_sft_model
    checkpoint = tmp_path / "elsewhere" / "final"
    shutil.copytree(source, checkpoint)
    assert {"config.py", "modeling.py", "moe.py"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # the remote code lands in a fresh module cache
    result = subprocess.run([sys.executable, "-c", OUTSIDE, str(checkpoint), json.dumps(PROMPT)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outside = json.loads(result.stdout.strip().splitlines()[-1])
    assert outside["class"].startswith("transformers_modules.") and outside["use_moe"] == (kind == "moe")

    model, tokenizer = load_model(source, device="cpu", dtype="float32")
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    ours = generate_tokens(model, prompt, max_new_tokens=12, temperature=0, eos_token_id=tokenizer.eos_token_id)
    assert outside["tokens"] == ours[0].tolist()
    assert "answer" in tokenizer.decode(ours[0, prompt.shape[1]:])


def test_checkpoint_blocker_is_real(tmp_path):
    """The blocker in the outside process really stops this project's packages from importing."""
    script = OUTSIDE.split("from transformers")[0] + "import model\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "model is blocked" in result.stderr
