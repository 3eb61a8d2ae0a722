"""Stage 7: preference pairs (chosen / rejected) from an OpenAI-compatible generator and judge.

    python 7.gen_prefs_openai.py    # on-policy: serves out/sft/final locally, judges the tasks by their answers
    OPENAI_API_KEY=... python 7.gen_prefs_openai.py --generator_model gpt-4o --prompts_path out/data/sft_train.jsonl

Writes out/prefs/dpo_pairs.jsonl (resumable). Flags, environment and output format: docs/prefs.md.
"""
from mateconv.prefs.cli import main
from mateconv.terminal import run_main

if __name__ == "__main__":
    run_main(lambda: main() and 0)  # main returns the run's summary (for callers in Python), already printed
