"""`moescope bench MODEL_DIR --tasks NAMES`: lm-evaluation-harness tasks on the model, in memory
(needs moescope[eval]; the method: moescope.judge.bench).

lm-eval task files are code, not data: a YAML file under --include-path may name Python functions
(`!function module.name`) that lm-eval imports and runs, from files beside it. Give only task
directories you trust, as you would a script.
"""

from __future__ import annotations

import argparse
import json

from moescope.backends.hf.loading import load_model, load_tokenizer
from moescope.commands.common import (
    NONNEGATIVE_INT,
    POSITIVE_INT,
    add_overwrite_argument,
    add_placement_arguments,
    placement_from_args,
)
from moescope.errors import MoescopeError
from moescope.judge.bench import lm_eval_modules, metric_rows, run_tasks
from moescope.output import FILE, write_atomic

OUTPUTS = {"json": FILE}
INPUTS = ("model", "include_path")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="local checkpoint (original, quantised or pruned)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", metavar="DIR",
                        help="directory of extra lm-eval task YAML files. These RUN CODE: a task file may name Python "
                        "functions (lm-eval's `!function`) that are imported and run from files beside it; give only "
                        "directories you trust")
    parser.add_argument("--limit", type=POSITIVE_INT, help="at most this many examples per task (for a quick look)")
    parser.add_argument("--num-fewshot", type=NONNEGATIVE_INT,
                        help="few-shot examples per prompt (default: the task's)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    add_placement_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_overwrite_argument(parser, "--json")


def run(args: argparse.Namespace) -> int:
    lm_eval_modules()  # fail fast, before loading the model
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MoescopeError("--tasks is empty: name at least one lm-eval task")
    model = load_model(args.model, placement_from_args(args))
    results = run_tasks(model, load_tokenizer(args.model), tasks, args.include_path, args.limit, args.num_fewshot,
                        args.batch_size)
    for task, name, value, stderr in metric_rows(results):
        spread = f" ± {stderr:.4f}" if stderr is not None else ""
        print(f"{task:<24} {name:<16} {value:.4f}{spread}")
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=1, default=str) + "\n")
    return 0
