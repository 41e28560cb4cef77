"""lm-evaluation-harness tasks on the model object being swept (its HFLM wraps a loaded model).

Tasks come from lm-eval's registry or from task YAMLs in `task_dir` (lm-eval's `include_path`)
whose `dataset_path: json` + `dataset_kwargs.data_files` name local files, so nothing is fetched.
"""

from __future__ import annotations

import logging
import math
import os

from ..optional import require

logger = logging.getLogger(__name__)


def _lm_eval():
    lm_eval = require("lm_eval", "--tasks (lm-evaluation-harness)", extra="eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    return lm_eval, HFLM, TaskManager


def _numbers(metrics: dict) -> dict[str, float]:
    """lm-eval's "metric,filter" entries, finite numbers only (a stderr of one example is "N/A")."""
    return {k: float(v) for k, v in metrics.items()
            if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _task_manager(TaskManager, tasks: list[str], task_dir):
    """Only the local YAMLs when they hold every task: indexing lm-eval's own registry takes a while."""
    if task_dir is not None:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(task_dir) if task_dir else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)} (not in lm-eval's registry or --task-dir)")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], task_dir: str | os.PathLike | None = None, *,
              limit: int | None = None, batch_size: int = 1) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from `lm_eval.simple_evaluate` on `model` as it is now (current α, β)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    if task_dir is not None and not os.path.isdir(task_dir):
        raise FileNotFoundError(f"{task_dir}: no such task folder (--task-dir)")
    manager = _task_manager(TaskManager, tasks, task_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  log_samples=False, bootstrap_iters=0)
    return {task: _numbers(metrics) for task, metrics in out["results"].items()}
