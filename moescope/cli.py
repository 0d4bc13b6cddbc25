"""`moescope <verb>`: one module per verb in moescope.commands, each with `add_arguments(parser)` and `run(args)`.

Verb modules are imported only when their verb runs, so `moescope --help` never imports torch.
Errors meant for the user are `MoescopeError`s: printed as one line, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moescope.errors import MoescopeError

# verb -> (module in moescope.commands, one-line help). Keep the help here so `--help` needs no imports.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the whole pipeline on the embedded demo model and write a report of findings"),
    "inspect": ("inspect", "show the MoE structure of a local checkpoint without loading weights"),
    "profile": ("profile", "count which experts a model uses over a tagged calibration set"),
    "merge": ("merge", "add profiles of the same model (e.g. shards) into one"),
    "quantize": ("quantize", "write a fake-quantised checkpoint from a per-expert bit plan"),
    "export": ("export", "turn a bit plan into what llama.cpp, compressed-tensors or MLX can load"),
    "stats": ("stats", "routing metrics per layer with error bars and unseen-expert estimates"),
    "report": ("report", "write a self-contained HTML report of a profile (plots, tiers, summary)"),
    "plan": ("plan", "turn a profile into a plan: experts to prune or merge, or tiers and their bit plan"),
    "prune": ("prune", "write a pruned or merged checkpoint from a plan, then replay to prove it"),
    "evaluate": ("evaluate", "perplexity per domain and language; KL, top-1 and routing drift vs a baseline"),
    "sweep": ("sweep", "perplexity per domain across pruning ratios or average bits, per method (CSV + SVG)"),
    "accuracy": ("accuracy", "accuracy on labelled multiple-choice items per layer and expert (OLMoE-style)"),
    "bench": ("bench", "lm-evaluation-harness tasks on the model in memory (needs moescope[eval])"),
    "gate": ("gate", "compare a compressed model's answers with the original's: pass / warn / fail"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moescope",
        description="Profile which experts a Mixture-of-Experts model uses and compress it safely.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            importlib.import_module(f"moescope.commands.{module_name}").add_arguments(verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in VERBS else None)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return importlib.import_module(f"moescope.commands.{VERBS[args.verb][0]}").run(args) or 0
    except MoescopeError as error:
        print(f"moescope {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moescope {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
