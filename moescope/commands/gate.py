"""`moescope gate BASE_DIR CANDIDATE_DIR --probes probes.jsonl --out gate.html`: the regression gate.

Greedy-decodes the baseline and the candidate on every probe and compares the answers (language,
script, length, repetition, expected terms, KL along the baseline's answer; moescope.judge.gate),
then writes a self-contained HTML page and optionally JSON.

Exit status, so a CI job can stop a bad compression before anyone ships it and still tell a verdict
from a run that never reached one: 0 the candidate passed; 1 it did not (a "fail" verdict, or "warn"
unless --fail-on fail); 2 the gate could not run (bad input, a missing model, ...: one line says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from moescope.calibration import PROBES
from moescope.commands.common import (
    POSITIVE_INT,
    add_backend_argument,
    add_overwrite_argument,
    add_placement_arguments,
    bounded,
    placement_from_args,
)
from moescope.judge.gate import GateOptions, gate
from moescope.judge.safety import DEFAULTS, VERDICTS, Thresholds
from moescope.output import FILE, write_atomic
from moescope.report.gate_page import render_html

OUTPUTS = {"out": FILE, "json": FILE}
INPUTS = ("base", "candidate", "probes")
DID_NOT_PASS = 1


def threshold(text: str) -> tuple[str, float]:
    """NAME=VALUE of a gate threshold; VALUE a number >= 0 of the threshold's own type (int or float)."""
    name, _, value = text.partition("=")
    kinds = {f.name: type(getattr(DEFAULTS, f.name)) for f in dataclasses.fields(Thresholds)}
    if name not in kinds or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(sorted(kinds))}")
    return name, bounded(kinds[name], 0)(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE_DIR", help="the uncompressed model (checkpoint directory)")
    parser.add_argument("candidate", metavar="CANDIDATE_DIR", help="the compressed model to judge")
    parser.add_argument("--probes", default=str(PROBES), help="probe set, JSONL (default: the embedded probes)")
    parser.add_argument("--out", default="gate.html", help="HTML page to write (default: gate.html)")
    parser.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=128, metavar="N",
                        help="answer length cap (default 128)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="probes decoded together (default 8)")
    add_placement_arguments(parser)
    add_backend_argument(parser, what="CANDIDATE_DIR")
    add_backend_argument(parser, "--baseline-backend", "BASE_DIR")
    parser.add_argument("--threshold", type=threshold, action="append", default=[], metavar="NAME=VALUE",
                        help="override a threshold, e.g. kl_fail=1.0 (repeatable; see docs/gate.md)")
    parser.add_argument("--fail-on", choices=("warn", "fail"), default="warn",
                        help="the verdict from which the exit status is 1: warn (default: a warning stops CI too) or "
                        "fail (warnings exit 0)")
    add_overwrite_argument(parser, "--out and --json")


def run(args: argparse.Namespace) -> int:
    th = dataclasses.replace(DEFAULTS, **dict(args.threshold))
    options = GateOptions(args.max_new_tokens, args.batch_size, placement_from_args(args), th, args.backend,
                          args.baseline_backend)
    report = gate(args.base, args.candidate, args.probes, options, log=lambda m: print(m, file=sys.stderr))
    write_atomic(args.out, render_html(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    for name, counts in report["checks"].items():
        print(f"{name:<11} " + "  ".join(f"{v} {counts[v]:>3}" for v in VERDICTS))
    by = report["prompts_by_verdict"]
    print(f"verdict: {report['verdict']} ({by['fail']} failing, {by['warn']} warning, {by['pass']} passing probes); "
          f"wrote {args.out}")
    return DID_NOT_PASS if VERDICTS.index(report["verdict"]) >= VERDICTS.index(args.fail_on) else 0
