"""Which part of stage 9 moves task accuracy? DPO variants side by side from the same SFT model and pairs.

Reads a finished tiny pipeline (`bash scripts/run_pipeline.sh` leaves it in ./out), trains each variant for the
same number of steps with the stage's own `run`, and reports, on prompts no variant trained on, the reward accuracy
on held-out on-policy pairs (out/tokens/prefs/val) and greedy accuracy on every validation task:

    .venv/bin/python benchmarks/dpo_ablation.py --out out --work /tmp/dpo_ablation

"NLL only" is the SFT term on the chosen replies with the DPO term switched off (beta 1e-6 leaves its gradient
~0; the reward accuracy only needs the sign of the implicit reward, which does not depend on beta).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mateconv.chat import load_model
from mateconv.config import DPOConfig, parse_config
from mateconv.data.shards import DPOTokens
from mateconv.evaluate.metrics import task_accuracy
from mateconv.train.dpo import DPOObjective
from mateconv.train.evaluators import preference_eval
from mateconv.train.stages import RECIPES, run

VARIANTS = {  # name -> (learning rate, dpo beta, sft coefficient, loss type)
    "DPO + NLL (preset tiny)": ("3e-4", "0.1", "1.0", "sigmoid"),
    "DPO + 0.2 NLL": ("3e-4", "0.1", "0.2", "sigmoid"),
    "NLL only": ("3e-4", "1e-6", "1.0", "sigmoid"),
    "DPO": ("1e-4", "0.1", "0", "sigmoid"),
    "DPO, beta 0.5": ("1e-4", "0.5", "0", "sigmoid"),
    "DPO, lr 3e-4": ("3e-4", "0.1", "0", "sigmoid"),
    "IPO": ("1e-4", "0.1", "0", "ipo"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out"), help="a finished pipeline's out/ directory")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dpo_ablation"), help="where the variants train")
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()

    sft_path = args.out / "sft/final"
    sft, tokenizer = load_model(sft_path, device="cpu", dtype="float32")
    tasks = [json.loads(line) for line in (args.out / "data/tasks_val.jsonl").read_text().splitlines()]
    held_out = DPOTokens(args.out / "tokens/prefs/val", 128)
    rows = [("SFT (start)", 0.0, task_accuracy(sft, tokenizer, tasks, max_new_tokens=24).accuracy)]
    for name, (lr, beta, sft_coef, loss_type) in VARIANTS.items():
        out_dir = args.work / name.replace(" ", "_").replace(",", "").replace("+", "plus")
        run(RECIPES["dpo"], parse_config([
            "--init_from", str(sft_path), "--data_path", str(args.out / "tokens/prefs/train"), "--val_data_path", "",
            "--forget_data_paths", "", "--out_dir", str(out_dir), "--resume", "never", "--max_seq_len", "128",
            "--batch_size", "16", "--max_steps", str(args.steps), "--warmup_iters", "0", "--learning_rate", lr,
            "--dpo_beta", beta, "--dpo_sft_coef", sft_coef, "--dpo_loss_type", loss_type, "--tracker", "none",
            "--num_workers", "0", "--device", "cpu", "--dtype", "float32", "--engine", "torch",
            "--save_interval_steps", str(args.steps), "--eval_interval", str(args.steps),
        ], RECIPES["dpo"].defaults))
        policy, _ = load_model(out_dir / "final", device="cpu", dtype="float32")
        pairs = preference_eval(policy, DPOObjective(DPOConfig(beta=float(beta)), reference=sft), held_out, 16, "cpu")
        rows.append((name, pairs["rewards/accuracies"], task_accuracy(policy, tokenizer, tasks, 24).accuracy))

    print(f"\n{len(held_out)} held-out on-policy pairs, {len(tasks)} validation tasks, {args.steps} steps of 16 pairs")
    print("| variant | held-out reward accuracy | greedy task accuracy |\n|---|---|---|")
    for name, reward_accuracy, accuracy in rows:
        print(f"| {name} | {reward_accuracy:.3f} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
