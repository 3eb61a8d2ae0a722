"""lm-evaluation-harness tasks over the verifiable prompts, and running lm-eval tasks by name on a checkpoint.

    lm_eval --model hf --model_args pretrained=out/sft/final,trust_remote_code=True \
        --include_path mateconv/lm_eval_tasks --tasks mateconv_tasks_gen,mateconv_tasks_mc --apply_chat_template
    python -m mateconv.evaluate --models out/sft/final --lm_eval_tasks mateconv_tasks_gen mateconv_tasks_mc
"""
from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("mateconv_tasks_gen", "mateconv_tasks_mc")


def unknown_tasks(task_names: list[str]) -> list[str]:
    """The names lm-eval knows neither as a task, group or tag (ours included) nor as a YAML file."""
    from lm_eval.tasks import TaskManager

    known = TaskManager(include_path=str(TASKS_DIR)).all_tasks
    return [name for name in task_names if name not in known and not Path(name).is_file()]


def run_lm_eval(model_path: str | Path, task_names: list[str], tasks_file: str | Path | None = None,
                limit: int | None = None, max_new_tokens: int = 48, device: str = "cpu") -> dict[str, float]:
    """{"<task>/<metric>": value} from lm-eval's `hf` model on `model_path` with the chat template applied (as
    `mateconv.evaluate` prompts). Our local tasks read `tasks_file` when given; other names are lm-eval's own."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    def spec(name: str) -> str | dict:
        """Our tasks as full configs pointing at `tasks_file` (lm-eval takes a dict as a whole new task)."""
        if tasks_file is None or name not in LOCAL_TASKS:
            return name
        config = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
        return {**config, "dataset_kwargs": {"data_files": {"test": str(Path(tasks_file).resolve())}}}

    tasks = [spec(name) for name in task_names]
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_path), "trust_remote_code": True, "dtype": "float32"},
        tasks=tasks, task_manager=TaskManager(include_path=str(TASKS_DIR)), apply_chat_template=True,
        batch_size=1, device=device, limit=limit, gen_kwargs={"max_gen_toks": max_new_tokens},
        log_samples=False, bootstrap_iters=0)
    return {f"{task}/{metric.split(',')[0]}": value for task, metrics in results["results"].items()
            for metric, value in metrics.items() if "stderr" not in metric and isinstance(value, (int, float))}
