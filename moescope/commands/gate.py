"""`moescope gate BASE_DIR CANDIDATE_DIR --probes probes.jsonl --out gate.html`: the regression gate.

Greedy-decodes the baseline and the candidate on every probe and compares the answers (language,
script, length, repetition, expected terms, KL along the baseline's answer; moescope.judge.gate),
then writes a self-contained HTML page and optionally JSON. The exit status is the verdict: 0 pass,
1 warn, 2 fail, so a CI job can stop a bad compression before anyone ships it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from moescope.calibration import PROBES
from moescope.commands.common import add_backend_argument, add_placement_arguments, placement_from_args
from moescope.judge.gate import GateOptions, gate
from moescope.judge.safety import DEFAULTS, VERDICTS, Thresholds
from moescope.output import write_atomic
from moescope.report.gate_page import render_html

EXIT = {"pass": 0, "warn": 1, "fail": 2}


def _threshold(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    known = {f.name for f in dataclasses.fields(Thresholds)}
    if name not in known or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(sorted(known))}")
    return name, float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE_DIR", help="the uncompressed model (checkpoint directory)")
    parser.add_argument("candidate", metavar="CANDIDATE_DIR", help="the compressed model to judge")
    parser.add_argument("--probes", default=str(PROBES), help="probe set, JSONL (default: the embedded probes)")
    parser.add_argument("--out", default="gate.html", help="HTML page to write (default: gate.html)")
    parser.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length cap (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="probes decoded together (default 8)")
    add_placement_arguments(parser)
    add_backend_argument(parser, what="CANDIDATE_DIR")
    add_backend_argument(parser, "--baseline-backend", "BASE_DIR")
    parser.add_argument("--threshold", type=_threshold, action="append", default=[], metavar="NAME=VALUE",
                        help="override a threshold, e.g. kl_fail=1.0 (repeatable; see docs/gate.md)")


def run(args: argparse.Namespace) -> int:
    defaults = dataclasses.asdict(DEFAULTS)
    th = Thresholds(**{**defaults, **{k: type(defaults[k])(v) for k, v in args.threshold}})
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
    return EXIT[report["verdict"]]
