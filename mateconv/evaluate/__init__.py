"""Stage 6: evaluate saved checkpoints side by side.

For each model directory: validation perplexity (token shards or a JSONL of texts/conversations), bits per byte on
whole held-out documents (tokenizer-independent), accuracy on the verifiable prompts of the embedded data set (greedy,
chat template), greedy samples on held-out prompts, and for MoE models the per-layer expert load with balance
statistics. With a judge endpoint, pairwise win rates (SFT vs pretrain, DPO vs SFT) on held-out prompts. Writes PNG
plots, summary.md, summary.csv and summary.json.

    python -m mateconv.evaluate --models out/pretrain/final out/sft/final out/dpo/final --out_dir out/eval

Modules: data (inputs), metrics, models (one model's evaluation), report (outputs), kept (work kept for a rerun),
run (`evaluate`), cli.
"""
