"""`moescope <verb>`: one module per verb in moescope.commands, each with `add_arguments(parser)` and `run(args)`.

Verb modules are imported only when their verb runs, so `moescope --help` never imports torch.

Exit status, so that a CI job can tell a verdict from a failure to reach one (docs/reliability.md):

    0    the run finished (`gate`: the candidate passed)
    1    `gate` only: the candidate did not pass (see `moescope gate --help` for --fail-on)
    2    the run could not be done: a bad argument, a missing, unreadable or corrupt file, an output
         that may not be written, a full disk, ... One line on stderr says what and what to do. An
         unexpected error (a bug in moescope) is one line too, saying where to report it
    130  interrupted (Ctrl-C); 141: the output pipe closed (e.g. `| head`)

`--debug` (anywhere on the line) adds the full traceback to any error. Before a verb runs, the
outputs it names in `OUTPUTS` ({argument: OutputKind}) are checked against the inputs it names in
`INPUTS` and locked until it ends (moescope.output.guarded), so nothing is written before the
arguments are known to be writable, and never over an input.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import sys
import traceback
from typing import NoReturn

from moescope import __version__
from moescope.errors import MoescopeError

# verb -> (module in moescope.commands, one-line help). Keep the help here so `--help` needs no imports.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the whole pipeline on the embedded demo model and write a report of findings"),
    "inspect": ("inspect", "show the MoE structure of a local checkpoint without loading weights"),
    "profile": ("profile", "count which experts a model uses over a tagged calibration set"),
    "ingest": ("ingest", "turn routing that SGLang, vLLM or Megatron-LM recorded into a profile"),
    "merge": ("merge", "add profiles of the same model (e.g. shards) into one"),
    "quantize": ("quantize", "write a fake-quantised checkpoint from a per-expert bit plan"),
    "export": ("export", "a bit plan for llama.cpp, compressed-tensors or MLX; a profile's expert load for EPLB"),
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
COULD_NOT_RUN, INTERRUPTED, PIPE_CLOSED = 2, 130, 141
OS_ADVICE = {
    errno.ENOSPC: "free some space or choose another place",
    errno.EDQUOT: "free some space or choose another place",
    errno.EFBIG: "the file is larger than this file system (or a file size limit) allows: choose another place",
    errno.EROFS: "the file system is read-only: choose another place",
    errno.EACCES: "check its permissions or choose another place",
    errno.EPERM: "check its permissions or choose another place",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a part of it is a file",
    errno.EISDIR: "it is a directory: give a file",
}


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(COULD_NOT_RUN, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="moescope", description="Profile which experts a Mixture-of-Experts model uses and "
                    "compress it safely. Exit status: 0 done; 1 `gate` did not pass; 2 could not run (one line says "
                    "why); 130 interrupted.")
    parser.add_argument("--debug", action="store_true", help="add the full traceback to any error (allowed anywhere)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            importlib.import_module(f"moescope.commands.{module_name}").add_arguments(verb_parser)
    return parser


def os_error_line(error: OSError) -> str:
    """An OSError as "what: path; what to do"."""
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    what = error.strerror or str(error) or type(error).__name__
    advice = OS_ADVICE.get(error.errno, "check the path and try again")
    return f"{what}{': ' + paths if paths else ''}; {advice}"


def error_line(error: BaseException) -> tuple[str, int]:
    """(one line, exit status) for an error that ended a run."""
    from safetensors import SafetensorError

    if isinstance(error, KeyboardInterrupt):  # a verb may say what to do next in its argument
        return "; ".join(["interrupted", *map(str, error.args)]), INTERRUPTED
    if isinstance(error, MoescopeError):
        return str(error), COULD_NOT_RUN
    if isinstance(error, OSError):
        return os_error_line(error), COULD_NOT_RUN
    if isinstance(error, SafetensorError):
        os_error = re.search(r"os error (\d+)", str(error))  # safetensors reports a failed read or write this way
        if os_error:
            return f"{error}; {OS_ADVICE.get(int(os_error[1]), 'check the path and try again')}", COULD_NOT_RUN
        return f"a safetensors file is corrupt or truncated ({error}); re-save it", COULD_NOT_RUN
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error}); save it as UTF-8", COULD_NOT_RUN
    if isinstance(error, json.JSONDecodeError):
        return f"a file is not valid JSON ({error})", COULD_NOT_RUN
    if isinstance(error, MemoryError):
        return ("out of memory: a smaller --batch-size or --max-tokens, or a lower-precision --dtype, may fit (an "
                "input that claims an absurd size does this too)"), COULD_NOT_RUN
    return (f"internal error, a bug in moescope {__version__}: {type(error).__name__}: {error}. Please report it to "
            "the moescope issue tracker with the command line and the traceback that --debug prints"), COULD_NOT_RUN


def run_verb(args: argparse.Namespace) -> int:
    """Import the verb's module and run it with its outputs checked and locked."""
    from moescope.output import guarded

    module = importlib.import_module(f"moescope.commands.{VERBS[args.verb][0]}")
    outputs = {f"--{name.replace('_', '-')}": (getattr(args, name), kind)
               for name, kind in getattr(module, "OUTPUTS", {}).items() if getattr(args, name, None)}
    sources = []
    for name in getattr(module, "INPUTS", ()):
        value = getattr(args, name, None)
        sources += value if isinstance(value, list) else [value] if value else []
    # resuming a profile may find it complete: that is not an output to refuse
    overwrite = bool(getattr(args, "overwrite", False) or getattr(args, "resume", False))
    with guarded(outputs, sources, overwrite):
        return module.run(args) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in VERBS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error already printed in one line (2)
        return stop.code
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return run_verb(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED
    except (Exception, KeyboardInterrupt) as error:
        if debug:
            traceback.print_exc()
        message, status = error_line(error)
        print(f"moescope {args.verb}: error: {' '.join(message.split())}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
