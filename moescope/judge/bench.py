"""lm-evaluation-harness tasks on a model in memory (`moescope bench`).

The model is loaded the way every other verb loads it (local path, no hub) and handed to
lm-evaluation-harness as an object (`HFLM(pretrained=model)`), so a fake-quantised or pruned model
is scored exactly as moescope built it. Hub access is switched off before lm-eval is imported
(also in hub modules imported earlier): tasks whose data is not on local disk fail instead of
downloading. Task definitions can come from `--include-path` (a directory of lm-eval task YAML
files, e.g. with `dataset_path: json` and local `data_files`). Needs the optional extra:
pip install 'moescope[eval]'.
"""

from __future__ import annotations

import os
from pathlib import Path

from moescope.backends.hf.loading import input_device
from moescope.errors import MoescopeError


def hub_offline() -> None:
    """Switch Hugging Face hub and dataset downloads off, unless the caller's environment says
    otherwise. huggingface_hub and datasets read the variables once, at import, so modules already
    imported (by transformers, or by a caller's own code) get their flags set as well."""
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if os.environ["HF_HUB_OFFLINE"].upper() not in ("1", "ON", "YES", "TRUE"):
        return
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True


def lm_eval_modules():
    """lm-eval's entry points, imported offline; MoescopeError when the extra is missing."""
    hub_offline()
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MoescopeError("lm-evaluation-harness is not installed: pip install 'moescope[eval]'") from None
    return simple_evaluate, HFLM, TaskManager


def task_manager(TaskManager, tasks: list[str], include_path: str | Path | None):
    """Only the tasks under `include_path` when they hold every task asked for (indexing lm-eval's
    ~15k built-in task files takes 5-15 s), else those plus the built-in ones."""
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in manager.all_tasks for task in tasks):
            return manager
    return TaskManager(include_path=str(include_path) if include_path else None)


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | Path | None = None, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 8) -> dict:
    """lm-eval's results for `tasks` on the in-memory `model`: {task: {metric: value}} plus sample counts."""
    simple_evaluate, HFLM, TaskManager = lm_eval_modules()
    if include_path is not None and not Path(include_path).is_dir():
        raise MoescopeError(f"--include-path {include_path}: no such directory of task YAML files")
    manager = task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MoescopeError(f"unknown lm-eval task(s) {', '.join(unknown)}: give --include-path with their YAML, "
                            "or `lm-eval ls tasks` to list the built-in ones")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm._device = input_device(model)  # lm-eval takes the first weight's device, `meta` where accelerate offloaded it
    try:
        output = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                 log_samples=False)
    except (ConnectionError, OSError) as error:  # a task whose data would have to be downloaded
        raise MoescopeError(f"lm-eval could not read a task's data offline ({error}); put the data on local disk "
                            "and point the task YAML at it") from None
    return {"results": output["results"], "samples": output.get("n-samples", {}),
            "config": {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot}}


def metric_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every numeric metric lm-eval reported."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            name, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and key != "alias":
                stderr = metrics.get(key.replace(name, f"{name}_stderr", 1))
                rows.append((task, name, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows
