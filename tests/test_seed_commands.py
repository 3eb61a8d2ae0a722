"""The training command lines of seed 004 (../shared/seeds/004_*.md) run as written, with tiny sizes appended, from a
non-interactive shell through the DeepSpeed CPU launcher, in a directory laid out the way the seed expects: the stage
scripts at its top, `out/` (tokenizer and token shards), `dataset/dpo_pairs.jsonl`, `logs/`. Each command's
outputs are where the seed's next command looks for them, and its log holds plain progress lines."""
from __future__ import annotations

import importlib.metadata
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_MODEL_FLAGS, read_metrics, single_thread_env

from mateconv.procs import free_port

pytestmark = pytest.mark.slow
# The model flags of the test world; the launcher picks DeepSpeed and the seeds' flags pick the tracker.
TINY = [flag for flag in TINY_MODEL_FLAGS if flag not in ("--engine", "torch", "--tracker", "none")] + [
    "--batch_size", "4", "--max_steps", "4", "--log_interval", "1", "--eval_interval", "2", "--eval_batches", "2",
    "--save_interval", "2"]
STEP_LINE = re.compile(r"^\[(\w+)\] step (\d+)/(\d+) loss [\d.]+ lr [\d.e+-]+ grad_norm \S+ tok/s [\d,]+ "
                       r"mem_gb [\d.]+ elapsed [\d:]+ eta [\d:]+$")



def seed_command(line: str, ranks: int) -> str:
    """A seed command line with tiny sizes appended (before the redirection), a free port, `ranks` processes, and a
    wait for the backgrounded job, as a non-interactive shell runs it."""
    line = line.replace("--num_gpus=2", f"--num_gpus={ranks}").replace("29500", str(free_port()))
    command, redirect = line.split(" > ", 1)
    return f"{command} {' '.join(TINY)} > {redirect}\nwait $!"


def make_seed_dir(root: Path, tiny_tokenizer: Path, tiny_tokens: Path, tiny_embedded_data: Path) -> Path:
    """A seed's working directory: the programs the seeds call, `out/tokenizer`, `out/tokens/{pretrain,sft}` and
    `dataset/dpo_pairs.jsonl` (stage 2's TRL pairs, the format stage 7 writes, plus one broken line)."""
    for script in ("4.pretrain.py", "5.full_sft.py", "9.train_dpo.py", "pretrain_sft_lora.py", "eval_model.py"):
        (root / script).symlink_to(REPO / script)
    shutil.copytree(tiny_tokenizer, root / "out" / "tokenizer")
    for kind in ("pretrain", "sft"):
        (root / "out" / "tokens").mkdir(parents=True, exist_ok=True)
        (root / "out" / "tokens" / kind).symlink_to(tiny_tokens / kind)
    (root / "dataset").mkdir()
    pairs = (tiny_embedded_data / "dpo_train.jsonl").read_text().splitlines()[:40]
    (root / "dataset" / "dpo_pairs.jsonl").write_text("\n".join(pairs[:20] + ["{broken"] + pairs[20:]) + "\n")
    return root


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory, tiny_tokenizer, tiny_tokens, tiny_embedded_data) -> Path:
    return make_seed_dir(tmp_path_factory.mktemp("seed"), tiny_tokenizer, tiny_tokens, tiny_embedded_data)


def run_shell(script: str, cwd: Path) -> None:
    """`script` in a non-interactive bash in `cwd`, with `python` and `deepspeed` of this environment on the PATH
    (only those two: a venv's own `ninja` first on the PATH would make DeepSpeed rebuild its CPU op, ninja versions
    disagreeing on the build log, for every later test that finds the system one)."""
    tools = cwd / "bin"
    tools.mkdir(exist_ok=True)
    for name, target in (("python", Path(sys.executable)), ("deepspeed", Path(sys.executable).with_name("deepspeed"))):
        (tools / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (tools / name).chmod(0o755)
    env = {**single_thread_env(), "PATH": f"{tools}:{single_thread_env()['PATH']}"}
    try:
        result = subprocess.run(["bash", "-c", f"set -e\nmkdir -p logs\n{script}"], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:  # say where each command had got to (its log's end)
        tails = [f"--- {log.name}: {log.read_text()[-1500:]}" for log in sorted((cwd / "logs").glob("*.log"))]
        pytest.fail("timed out after 600 s\n" + "\n".join(tails))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def progress_lines(log: Path, stage: str) -> list[tuple[int, int]]:
    """(step, total) of the plain progress lines of `stage` in a log, after checking the log has no bar redraws."""
    text = log.read_text()
    assert "\r" not in text and "Warning" not in text and "deprecated" not in text, text[-3000:]
    return [(int(m[2]), int(m[3])) for m in map(STEP_LINE.match, text.splitlines()) if m and m[1] == stage]


def wandb_project(out_dir: Path) -> list[str]:
    """The project names in the offline W&B runs under out_dir."""
    runs = list((out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs, f"no offline W&B run in {out_dir}"
    return [name for name in ("MateConv_MoE-pretrain", "MateConv_MoE-sft", "MateConv_DPO")
            if any(name.encode() in run.read_bytes() for run in runs)]


def test_seed_004_pretrain_sft_dpo(seed_dir):
    # (1) pretraining, and its W&B variant (the first resumes into the second's finished run: nothing is lost)
    run_shell('export WANDB_PROJECT="MateConv_MoE-pretrain"\n' + seed_command(
        'nohup deepspeed --master_port 29500 --num_gpus=2 4.pretrain.py   --epochs 15 --use_wandb --wandb_project '
        '"$WANDB_PROJECT"   > logs/pretrain.log 2>&1 & echo $! > pretrain.pid', 1), seed_dir)
    pretrain = seed_dir / "out" / "pretrain"
    assert (pretrain / "final" / "config.json").is_file() and (seed_dir / "pretrain.pid").is_file()
    assert wandb_project(pretrain) == ["MateConv_MoE-pretrain"]
    assert progress_lines(seed_dir / "logs" / "pretrain.log", "pretrain") == [(step, 4) for step in (1, 2, 3, 4)]

    # (2) SFT with `--out_dir out`: the layout root, so it starts from out/pretrain/final and writes out/sft
    run_shell('export WANDB_PROJECT="MateConv_MoE-sft"\n' + seed_command(
        'nohup deepspeed --master_port 29500 --num_gpus=2 5.full_sft.py   --out_dir out --epochs 5 --use_wandb '
        '--wandb_project "$WANDB_PROJECT"   > logs/sft.log 2>&1 & echo $! > sft.pid', 1), seed_dir)
    sft = seed_dir / "out" / "sft"
    assert (sft / "final" / "config.json").is_file() and not (seed_dir / "out" / "final").exists()
    assert (pretrain / "final" / "config.json").is_file()  # not clobbered
    assert wandb_project(sft) == ["MateConv_MoE-sft"]
    sft_log = (seed_dir / "logs" / "sft.log").read_text()
    assert "-> out/sft" in sft_log and len(progress_lines(seed_dir / "logs" / "sft.log", "sft")) == 4
    assert json.loads((sft / "final" / "config.json").read_text())["dim"] == 64

    # (3) DPO on the raw pairs file, two ranks: rank 0 tokenizes it (the broken line skipped), both train on it
    run_shell('export WANDB_PROJECT="MateConv_DPO"\n' + seed_command(
        'nohup deepspeed --master_port 29500 --num_gpus=2 9.train_dpo.py   --out_dir out_dpo   --pairs_path '
        './dataset/dpo_pairs.jsonl   --epochs 20 --max_steps 1800 --batch_size 16 --learning_rate 1e-4   --beta 0.2 '
        '--kl_coef 0.05 --warmup_ratio 0.06   --accumulation_steps 2 --grad_clip 1.0 --use_wandb   '
        '> logs/dpo_train.log 2>&1 & echo $! > dpo_train.pid', 2), seed_dir)
    dpo = seed_dir / "out_dpo"
    assert (dpo / "final" / "config.json").is_file() and wandb_project(dpo) == ["MateConv_DPO"]
    dpo_log = (seed_dir / "logs" / "dpo_train.log").read_text()
    assert "dataset/dpo_pairs.jsonl: 40 records" in dpo_log and "dpo_pairs.jsonl:21: malformed JSON" in dpo_log
    assert "2 rank(s)" in dpo_log and "policy out/sft/final" in dpo_log and "beta=0.2" in dpo_log
    assert "kl_coef=0.05" in dpo_log
    rows = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if "rewards/accuracies" in row]
    assert [row["step"] for row in trained] == [1, 2, 3, 4] and all(row["kl_ref"] >= 0 for row in trained)
    assert any("forget/sft_ppl" in row for row in rows)
    assert len(progress_lines(seed_dir / "logs" / "dpo_train.log", "out_dpo")) == 4

    # (1') and (2') the plain commands, run again: each finds its finished run and leaves it as it was
    steps = {path: path.read_text() for path in (pretrain / "metrics.jsonl", sft / "metrics.jsonl")}
    run_shell(seed_command('nohup deepspeed --master_port 29500 --num_gpus=2 4.pretrain.py --epochs 15   '
                           '> logs/train.log 2>&1 & echo $! > train.pid', 1)
              + "\n" + seed_command('CUDA_VISIBLE_DEVICES=0,1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 nohup deepspeed '
                                    '--num_gpus=2 5.full_sft.py --out_dir out --epochs 5   > logs/sft.log 2>&1 & '
                                    'echo $! > sft.pid', 1), seed_dir)
    for log in ("train.log", "sft.log"):
        assert "resumed from" in (seed_dir / "logs" / log).read_text()
    for path, before in steps.items():
        assert path.read_text() == before


def test_seed_000_sweep_command(seed_dir):
    """`python run_sweep.py --config sweep_config.yaml --count N --mode pretrain --gpu 0,1` as seed 000 writes it:
    the YAML names no program, `--mode` picks the stage, `--gpu` the devices; offline, Optuna runs the trial."""
    (seed_dir / "run_sweep.py").symlink_to(REPO / "run_sweep.py")
    model = dict(zip(TINY[::2], TINY[1::2]))
    constants = {key.removeprefix("--"): {"value": value} for key, value in model.items()}
    (seed_dir / "sweep_config.yaml").write_text(json.dumps({
        "method": "random", "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": {**constants, "engine": {"value": "torch"}, "tracker": {"value": "none"},
                       "learning_rate": {"values": [3e-3, 1e-3]}}}))
    run_shell("python run_sweep.py --config sweep_config.yaml --count 1 --mode pretrain --gpu 0,1", seed_dir)
    trial = seed_dir / "out" / "sweeps" / "sweep_config" / "trial_0000"
    assert (trial / "final" / "config.json").is_file() and (trial / "metrics.jsonl").is_file()
    assert "val_loss" in (seed_dir / "out" / "sweeps" / "sweep_config" / "summary.md").read_text()


def test_seed_000_one_program_and_eval_model(tmp_path, tiny_tokenizer, tiny_tokens, tiny_embedded_data):
    """Seed 000's own programs as its lines call them: `pretrain_sft_lora.py --mode pretrain` (its CPU line), then
    `--mode sft`, each the stage --mode names, writing out/pretrain and out/sft; then `eval_model.py --model_mode 1`
    chats with the SFT model, and refuses a `--dim`/`--n_layers` that is not the model's shape."""
    root = make_seed_dir(tmp_path, tiny_tokenizer, tiny_tokens, tiny_embedded_data)
    run_shell(seed_command("python pretrain_sft_lora.py --mode pretrain --device cpu --batch_size 2 --epochs 1 "
                           "--dim 128 --n_layers 2 --max_seq_len 128 --n_heads 4 > logs/pretrain.log 2>&1 &", 1)
              + "\n" + seed_command("python pretrain_sft_lora.py --mode sft --batch_size 16 --epochs 1 "
                                     "--learning_rate 5e-6 --save_interval 1000 --save_best_only --save_last "
                                     "> logs/sft.log 2>&1 &", 1), root)
    assert progress_lines(root / "logs" / "pretrain.log", "pretrain") == [(step, 4) for step in (1, 2, 3, 4)]
    assert "-> out/sft" in (root / "logs" / "sft.log").read_text()
    assert (root / "out" / "sft" / "final" / "config.json").is_file()
    command = [sys.executable, "eval_model.py", "--model_mode", "1", "--dim", "64", "--n_layers", "2", "--stream",
               "True", "--temperature", "0", "--max_new_tokens", "8"]
    chat = subprocess.run(command, cwd=root, env=single_thread_env(), input="What is 2 + 2?\n/exit\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and chat.stdout.count(">>> ") == 2 and chat.stdout.split(">>> ")[1] != "", \
        chat.stdout + chat.stderr[-2000:]
    wrong = subprocess.run(command[:4] + ["--dim", "512", "--n_layers", "8"], cwd=root, env=single_thread_env(),
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1 and wrong.stderr.strip() == \
        "eval_model: out/sft/final has dim 64, n_layers 2, not dim 512, n_layers 8"
    unknown = subprocess.run([sys.executable, "pretrain_sft_lora.py", "--mode", "ppo"], cwd=root,
                             env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 1 and unknown.stderr.startswith("pretrain_sft_lora: --mode 'ppo' is not a stage")
    test = [sys.executable, "pretrain_sft_lora.py", "--mode", "test", "--device", "cpu", "--batch_size", "2",
            "--dim", "64", "--n_layers", "2", "--epochs", "1"]
    tested = subprocess.run(test, cwd=root, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert tested.returncode == 0, tested.stdout[-2000:] + tested.stderr[-2000:]
    assert "--mode test does not use --epochs" in tested.stdout
    summary = json.loads((root / "out" / "eval" / "summary.json").read_text())
    assert [row["path"] for row in summary["models"]] == ["out/pretrain/final", "out/sft/final"]
    assert all(math.isfinite(row["val_ppl"]) and row["samples"] for row in summary["models"]), summary
    wrong = subprocess.run(test[:8] + ["--dim", "512"], cwd=root, env=single_thread_env(), capture_output=True,
                           text=True, timeout=300)
    assert wrong.returncode == 1 and wrong.stderr.strip() == \
        "pretrain_sft_lora: out/pretrain/final has dim 64, n_layers 2, not dim 512"


def test_seed_001_layout_defaults_and_model_checks(tmp_path, tiny_tokenizer, tiny_embedded_data, monkeypatch, capsys):
    """Seed 001's program in a directory laid out as it asks (`./dataset/pretrain_hq.jsonl`, the tokenizer in
    `./model/zer02llm_tokenizer`, no out/): its small-scale line (no --data_path) trains on those files with its flags
    table's accumulation_steps 8; its MoE line into the same out/pretrain is refused naming use_moe, and its SFT
    line's `--dim 512 --n_layers 8` on that dim-128 model is refused naming both (before: a traceback from
    load_state_dict, and an SFT of the dense model with a config.yaml saying MoE)."""
    from mateconv.train.command import main_one_program

    (tmp_path / "dataset").mkdir()
    shutil.copy(tiny_embedded_data / "pretrain_train.jsonl", tmp_path / "dataset" / "pretrain_hq.jsonl")
    shutil.copytree(tiny_tokenizer, tmp_path / "model" / "zer02llm_tokenizer")
    monkeypatch.chdir(tmp_path)
    tiny = ["--max_steps", "2", "--max_seq_len", "96", "--n_heads", "4", "--vocab_size", "512", "--device", "cpu",
            "--dtype", "float32", "--engine", "torch", "--tracker", "none", "--num_workers", "0"]
    assert main_one_program("pretrain_sft_lora", ["--mode", "pretrain", "--dim", "128", "--n_layers", "4",
                                                  "--batch_size", "8", "--epochs", "1", *tiny]) == 0
    saved = yaml.safe_load(Path("out/pretrain/checkpoints/step_00000002/config.yaml").read_text())
    assert (saved["data"]["data_path"], saved["data"]["tokenizer_path"], saved["optim"]["accumulation_steps"]) == (
        "dataset/pretrain_hq.jsonl", "model/zer02llm_tokenizer", 8)
    assert "dataset/pretrain_hq.jsonl: " in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^pretrain: resume: out/pretrain/checkpoints/step_00000002 holds another "
                                         r"model \(use_moe False there, True here; n_routed_experts 4 there, 8 here\)"):
        main_one_program("pretrain_sft_lora", ["--mode", "pretrain", "--dim", "128", "--n_layers", "4", "--use_moe",
                                               "--n_routed_experts", "8", "--num_experts_per_tok", "2", *tiny])
    with pytest.raises(SystemExit, match=r"^sft: init_from out/pretrain/final is the model this run trains, as it is: "
                                         r"dim 512 \(it has 128\), n_layers 8 \(it has 4\)"):
        main_one_program("pretrain_sft_lora", ["--mode", "sft", "--batch_size", "32", "--epochs", "1",
                                               "--learning_rate", "5e-4", "--dim", "512", "--n_layers", "8",
                                               "--data_path", "./dataset/sft_data.jsonl", *tiny])


# Seed 003's config, its README's keys with tiny sizes: `{...}` are filled in per stage.
SEED_003_CONFIG = """\
seed: 0
exp_name: my_experiment
datasets:
  - type: custom_dataset
    path: {data}
trainer: BasicTrainer
optimizer: AdamW
lr: 1e-4
total_batch_size: {total}
gradient_accumulation_steps: {accumulation}
max_length: 96
n_epochs: 1
model:
  name_or_path: {model}
  policy_dtype: float32
loss:
  name: {loss}
  beta: 0.1
activation_checkpointing: true
wandb:
  enabled: {wandb}
  entity: your_entity
  project: "Minimal-LLM-Alignment"
report_to_tensorboard: {tensorboard}
do_first_eval: true
eval_every_steps: 2
n_eval_examples: 8
"""


def sharegpt_pair(record: dict) -> dict:
    """A preference pair in seed 003's shape: `conversations` of {from, value}, chosen/rejected one such turn."""
    def turn(message):
        return {"from": {"user": "human", "assistant": "gpt"}.get(message["role"], message["role"]),
                "value": message["content"]}
    return {"conversations": [turn(m) for m in record["prompt"]], "chosen": turn(record["chosen"][0]),
            "rejected": turn(record["rejected"][0])}


def test_seed_003_train_py(tmp_path, tiny_embedded_data, tiny_pretrain_model):
    """Seed 003's program as its README calls it, `python train.py config.yml`, with its config keys and data
    shapes (an SFT JSON array of `messages` with system turns; DPO pairs of sharegpt `conversations` with chosen and
    rejected one {from, value} turn each): SFT from a pretrained model, then its two override lines,
    `--overrides lr=2e-5 batch_size=32` and `--overrides trainer=FSDPTrainer`, each a DPO run from the SFT model."""
    (tmp_path / "train.py").symlink_to(REPO / "train.py")
    data = tmp_path / "path" / "to"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (tiny_embedded_data / f"sft_{split}.jsonl").read_text().splitlines()]
        json.dump([{"messages": row["messages"]} for row in rows[:64]], (data / f"sft_{split}.json").open("w"))
    pairs = (tiny_embedded_data / "dpo_train.jsonl").read_text().splitlines()[:64]
    json.dump([sharegpt_pair(json.loads(line)) for line in pairs], (data / "dpo.json").open("w"))
    assert any(m["role"] == "system" for row in json.loads((data / "sft_train.json").read_text())
               for m in row["messages"])
    (tmp_path / "sft.yml").write_text(SEED_003_CONFIG.format(
        data="path/to/sft_train.json", total=16, accumulation=4, model=tiny_pretrain_model, loss="sft", wandb="true",
        tensorboard="false"))
    (tmp_path / "dpo.yml").write_text(SEED_003_CONFIG.format(
        data="path/to/dpo.json", total=8, accumulation=1, model="out/sft/final", loss="dpo", wandb="false",
        tensorboard="true"))
    run_shell("python train.py sft.yml --overrides val_data_path=path/to/sft_val.json log_interval=1 "
              "> logs/sft.log 2>&1\n"
              "python train.py dpo.yml --overrides lr=2e-5 batch_size=32 > logs/dpo.log 2>&1\n"
              "python train.py dpo.yml --overrides trainer=FSDPTrainer out_dir=out/dpo_fsdp > logs/fsdp.log 2>&1",
              tmp_path)
    out = tmp_path / "out"
    # SFT: 64 conversations, 16 a step (4 micro-batches of 4), evaluated at the start and every 2 steps on 8 of them
    assert progress_lines(tmp_path / "logs" / "sft.log", "sft") == [(step, 4) for step in (1, 2, 3, 4)]
    sft = yaml.safe_load((out / "sft" / "checkpoints" / "step_00000004" / "config.yaml").read_text())
    assert (sft["optim"]["batch_size"], sft["optim"]["accumulation_steps"], sft["track"]["eval_examples"],
            sft["checkpoint"]["init_from"], sft["parallel"]["gradient_checkpointing"], sft["optim"]["seed"]) == (
        4, 4, 8, str(tiny_pretrain_model), True, 0)
    evaluated = [row["step"] for row in read_metrics(out / "sft") if "val_loss" in row]
    assert evaluated == [0, 2, 4]
    runs = list((out / "sft" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and all(name in runs[0].read_bytes() for name in (b"Minimal-LLM-Alignment", b"my_experiment",
                                                                              b"your_entity"))
    # DPO, the seed's override line: 64 pairs in 2 steps of 32, at lr 2e-5, TensorBoard instead of W&B
    dpo = yaml.safe_load((out / "dpo" / "checkpoints" / "step_00000002" / "config.yaml").read_text())
    assert (dpo["optim"]["batch_size"], dpo["optim"]["learning_rate"], dpo["dpo"]["beta"],
            dpo["checkpoint"]["init_from"]) == (32, 2e-5, 0.1, "out/sft/final")
    assert list((out / "dpo" / "tensorboard").glob("events.*")) and not (out / "dpo" / "wandb").exists()
    # DPO under FSDP: 8 steps of 8
    log = (tmp_path / "logs" / "fsdp.log").read_text()
    assert "PyTorch FSDP, 1 rank(s)" in log and "[dpo] done: step 8" in log, log[-2000:]
    assert (out / "dpo_fsdp" / "final" / "model.safetensors").is_file()


# Seed 000's and 001's command lines (their one program with --mode) and every flag of their tables, with the
# tables' values. Each parses for the stage its --mode names.
SEED_000_001 = [
    "--mode pretrain --device cpu --batch_size 2 --epochs 1 --dim 128 --n_layers 2 --max_seq_len 128 --n_heads 4",
    "--mode pretrain --batch_size 32 --epochs 1 --learning_rate 5e-4 --dim 512 --n_layers 8 --accumulation_steps 8 "
    "--save_interval 1000 --save_best_only --save_last --save_interval_steps 1000 --keep_checkpoint_max 5",
    "--mode pretrain --batch_size 32 --use_wandb --wandb_project Zer02LLM --wandb_log_model --wandb_log_code "
    "--wandb_watch_model --save_best_only --save_last",
    "--mode pretrain --ddp --batch_size 16 --accumulation_steps 8 --save_interval 1000 --save_best_only --save_last",
    "--mode sft --use_moe --n_routed_experts 8 --num_experts_per_tok 2 --batch_size 8 --save_best_only --save_last",
    "--mode dpo --batch_size 4 --accumulation_steps 4 --learning_rate 1e-8 --max_seq_len 3000 --save_best_only",
    "--mode pretrain --data_path ./dataset/pretrain_hq.jsonl --dtype float32 --flash_attn --use_wandb",
    "--out_dir out --device cuda:0 --dtype bfloat16 --wandb_run_name r1 --wandb_log_freq 1 --wandb_watch_log all "
    "--wandb_watch_log_freq 100 --log_interval 100 --num_workers 1 --local_rank -1 --grad_clip 1.0 --warmup_iters 0 "
    "--vocab_size 4000 --n_kv_heads 2 --rope_theta 10000.0 --dropout 0.1 --norm_eps 1e-8 --multiple_of 64 "
    "--n_shared_experts 0 --scoring_func softmax --aux_loss_alpha 0.1 --seq_aux --norm_topk_prob --use_moe",
    "--mode dpo --dpo_beta 0.1 --ref_model_path out/sft/final",
]


@pytest.mark.parametrize("line", SEED_000_001)
def test_seed_000_001_flags_parse(line, tmp_path, monkeypatch):
    from mateconv.config import parse_config
    from mateconv.train.stages import RECIPES

    monkeypatch.chdir(tmp_path)
    stage = line.split()[1] if line.startswith("--mode") else "pretrain"
    config = parse_config(line.split(), RECIPES[stage].defaults, stage)
    assert config.checkpoint.out_dir == f"out/{stage}"  # `out` (theirs) is the layout root here
    if "--use_wandb" in line:
        assert config.track.tracker == "wandb"
    if "--ddp" in line:
        assert config.parallel.engine == "torch"
    if "--wandb_watch_model" in line or "--wandb_watch_log" in line:
        assert config.track.wandb_watch == ("all" if "--wandb_watch_log all" in line else "gradients")
    if "--save_interval 1000" in line:
        assert config.checkpoint.save_interval_steps == 1000
    if "--wandb_log_freq 1" in line:
        assert (config.track.tracker_interval, config.track.log_interval) == (1, 100)


def test_seed_flags_errors_name_the_flag():
    from mateconv.config import ConfigError, parse_config

    for line, message in [("--mode sft", "5.full_sft.py trains sft"), ("--save_last false", "save_last"),
                          ("--use_wandb maybe", "use_wandb"), ("--wandb_watch_log often", "wandb_watch_log")]:
        with pytest.raises(ConfigError, match=message):
            parse_config(line.split(), {}, "pretrain")


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_help_lists_the_seed_flags(stage, capsys):
    from mateconv.train.command import main

    assert main(stage, ["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--use_wandb=tracker=wandb|none", "--pairs_path=data_path", "--save_interval=save_interval_steps",
                 "--ddp=engine=torch|auto", "--save_best_only=always", "--mode=", "--out_dir=out"):
        assert flag in text, flag
    assert ("--beta=dpo_beta" in text and "--kl_coef=dpo_kl_coef" in text) == (stage == "dpo")


def test_status_reads_the_progress_lines(tmp_path, capsys):
    """`scripts/status.sh` (mateconv.pipeline.last_progress) finds the state in the lines Progress prints to a log."""
    from mateconv.pipeline import last_progress
    from mateconv.train.tracking import Progress

    progress = Progress("pretrain", 4, 0, enabled=True)  # pytest's captured stdout is not a terminal
    for step, memory in ((1, "memory/rss_gb"), (2, "memory/peak_gb")):  # on a CPU, on a GPU
        progress.log(step, {"loss": 6.2, "lr": 5e-4, "grad_norm": 0.9, "tokens_per_sec": 6190.4, memory: 1.5})
    progress.log_eval(2, {"val_loss": 6.19})
    log = tmp_path / "pretrain.log"
    log.write_text(capsys.readouterr().out)
    assert [bool(STEP_LINE.match(line)) for line in log.read_text().splitlines()] == [True, True, False]
    assert re.fullmatch(r"2/4 elapsed 0:00:0\d eta 0:00:0\d, 6,190 tok/s", last_progress(log))
    # a stage that no longer runs (stopped, failed) has no ETA: `status` showed the one it had when it stopped
    assert re.fullmatch(r"2/4 elapsed 0:00:0\d, 6,190 tok/s", last_progress(log, running=False))

    from mateconv.terminal import PlainProgress  # stage 7's lines (and stage 3's)

    prefs = PlainProgress("prefs", 3000, "prompts")
    prefs.update(1200, pairs=1050, dropped=140, failed=10)
    log = tmp_path / "prefs.log"
    log.write_text(capsys.readouterr().out)
    assert re.fullmatch(r"1,200/3,000 prompts \(40%\) elapsed 0:00:00 eta 0:00:00", last_progress(log))
    assert last_progress(log, running=False) == "1,200/3,000 prompts (40%) elapsed 0:00:00"


def test_bars_off_a_terminal_write_nothing_and_still_count(capfd):
    from tqdm import tqdm

    from mateconv.terminal import bars_only_on_a_terminal

    bars_only_on_a_terminal()  # pytest's captured output is not a terminal
    bar = tqdm(range(5), desc="corpus")
    assert list(bar) == list(range(5)) and bar.n == 5  # e.g. the tokenizer checks bar.n for an empty corpus
    assert capfd.readouterr().err == ""


def test_seed_004_pip_install_requirements():
    """Seed 004's `pip install -r requirements.txt` resolves to MateConv itself at the tested versions: in the
    environment the suite runs in, pip has nothing else to install or change (offline: no index, no build env)."""
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                             "-r", "requirements.txt"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.findall(r"^Would install (.*)$", result.stdout, flags=re.M) == [
        f"mateconv-{importlib.metadata.version('mateconv')}"], result.stdout[-2000:]

