"""Hyperparameter sweeps from one YAML file in W&B's sweep schema, run by either of two backends.

- `wandb`: `wandb.sweep` registers the sweep, `wandb.agent` asks W&B for parameters; each run starts the program.
- `optuna`: an embedded Optuna study in `out/sweeps/<name>/study.db` (sqlite, so an interrupted sweep resumes),
  works offline, and writes a summary (best parameters, a table, a plot) next to the study.

Either way a trial is the program run as a subprocess with `--key value` flags (`mateconv.flags`) plus
`--out_dir <trial dir>`; the metric is the last value of `metric.name` in the trial's `metrics.jsonl` (W&B's default
summary: the last value). While a trial runs, its metrics.jsonl is followed: the Optuna backend reports each value of
the metric to the study's pruner (W&B's `early_terminate`), the W&B backend logs each row into the run; a trial
pruned or stopped by W&B is asked to stop with a checkpoint (`<trial dir>/STOP`).

Modules: config (the YAML file), trials (running one), optuna_backend, wandb_backend.
"""
