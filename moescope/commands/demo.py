"""`moescope demo --out DIR`: the whole pipeline on the embedded demo model, ending in one HTML page of
findings (the stages: moescope.report.demo)."""

from __future__ import annotations

import argparse
import time

import torch

from moescope.commands.common import POSITIVE_INT, add_placement_arguments, placement_from_args
from moescope.output import OutputKind
from moescope.report.demo import DemoSettings, run_demo

OUTPUTS = {"out": OutputKind("demo run", directory=True, reused=True)}  # complete stages are kept and reused


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (complete stages are reused)")
    parser.add_argument("--quick", action="store_true", help="a reduced run (for tests), about a minute")
    parser.add_argument("--threads", type=POSITIVE_INT, default=1,
                        help="torch threads (default 1: the demo model is tiny, and on a busy machine extra threads "
                             "spin against other processes and can be many times slower)")
    add_placement_arguments(parser, dtype="float32", dtype_help="float32, the demo model's own")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    index = run_demo(args.out, DemoSettings.make(args.quick, placement_from_args(args)))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; open {index}")
    return 0
