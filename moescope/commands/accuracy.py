"""`moescope accuracy MODEL_DIR --items items.jsonl --out acc.json`: accuracy per layer and expert, with
Wilson intervals (the method: moescope.judge.accuracy); `moescope report --accuracy` draws it."""

from __future__ import annotations

import argparse
import json

from moescope.analysis.accuracy import accuracy_lines
from moescope.backends.hf.loading import load_model, load_tokenizer
from moescope.commands.common import add_overwrite_argument
from moescope.judge.accuracy import expert_accuracy, load_items
from moescope.output import FILE, write_atomic

OUTPUTS = {"out": FILE}
INPUTS = ("model", "items")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="local checkpoint")
    parser.add_argument("--items", required=True, metavar="JSONL",
                        help="labelled multiple-choice items: calibration fields + choices + answer")
    parser.add_argument("--out", required=True, help="JSON to write (give it to `moescope report --accuracy`)")
    parser.add_argument("--dtype", help="e.g. bfloat16, float32 (default: the checkpoint's)")
    parser.add_argument("--device", help="e.g. cpu, cuda, auto (default: cpu)")
    add_overwrite_argument(parser, "--out")


def run(args: argparse.Namespace) -> int:
    items = load_items(args.items)
    model = load_model(args.model, dtype=args.dtype, device_map=args.device)
    result = expert_accuracy(model, load_tokenizer(args.model), items)
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    for line in accuracy_lines(result):
        print(line)
    print(f"wrote {args.out}")
    return 0

