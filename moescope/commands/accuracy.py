"""`moescope accuracy MODEL_DIR --items items.jsonl --out acc.json`: accuracy per layer and expert, with
Wilson intervals (the method: moescope.judge.accuracy); `moescope report --accuracy` draws it."""

from __future__ import annotations

import argparse
import json

from moescope.analysis.accuracy import accuracy_lines
from moescope.backends.hf.loading import load_tokenizer
from moescope.backends.select import open_model
from moescope.commands.common import (
    add_backend_argument,
    add_overwrite_argument,
    add_placement_arguments,
    placement_from_args,
)
from moescope.judge.accuracy import expert_accuracy, load_items
from moescope.output import FILE, write_atomic

OUTPUTS = {"out": FILE}
INPUTS = ("model", "items")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="local checkpoint")
    parser.add_argument("--items", required=True, metavar="JSONL",
                        help="labelled multiple-choice items: calibration fields + choices + answer")
    parser.add_argument("--out", required=True, help="JSON to write (give it to `moescope report --accuracy`)")
    add_placement_arguments(parser)
    add_backend_argument(parser)
    add_overwrite_argument(parser, "--out")


def run(args: argparse.Namespace) -> int:
    items = load_items(args.items)
    model = open_model(args.model, args.backend, placement_from_args(args))
    result = expert_accuracy(model, load_tokenizer(args.model), items)
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    for line in accuracy_lines(result):
        print(line)
    print(f"wrote {args.out}")
    return 0

