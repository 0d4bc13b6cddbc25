"""`moescope ingest FORMAT FILE... --model MODEL_DIR --out PROFILE_DIR`: a profile from an engine's dumps.

Reads the routing that SGLang, vLLM or Megatron-LM already record (moescope.profiling.ingest; the
layouts, engine versions and source files checked are in docs/scale.md) and writes an ordinary
profile that `stats`, `report`, `plan` and `export --format eplb` read. The dumps carry expert ids
or counts, not routing weights: what needs the weights says so instead of guessing.
"""

from __future__ import annotations

import argparse

from moescope.commands.common import POSITIVE_INT, add_overwrite_argument
from moescope.profiling.ingest import DUMP_FORMATS, IngestOptions, ingest
from moescope.profiling.store import PROFILE

OUTPUTS = {"out": PROFILE}
INPUTS = ("files", "model", "tags")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "formats:\n" + "\n".join(f"  {name:16} {module.DESCRIPTION}"
                                             for name, module in DUMP_FORMATS.items())
    parser.add_argument("format", metavar="FORMAT", choices=list(DUMP_FORMATS), help=", ".join(DUMP_FORMATS))
    parser.add_argument("files", nargs="+", metavar="FILE", help="dump files, read in the order given")
    parser.add_argument("--model", required=True, metavar="MODEL_DIR",
                        help="the checkpoint the engine served (its config is read, not its weights): gives the MoE "
                        "layers, experts and top-k the dump is checked and laid out against")
    parser.add_argument("--out", required=True, metavar="PROFILE_DIR", help="directory to write the profile to")
    parser.add_argument("--tags", metavar="FILE.jsonl",
                        help="per-request formats: one {\"id\", \"domain\", \"lang\"} object a line, keyed by the "
                        "response's request id; every request must have one")
    parser.add_argument("--domain", default="serving", help="domain of untagged requests and of count dumps")
    parser.add_argument("--lang", default="und", help="BCP-47 language of untagged requests (default und: unknown)")
    parser.add_argument("--coactivation", action="store_true",
                        help="per-request formats: also count expert pairs chosen together")
    parser.add_argument("--tensor-parallel", type=POSITIVE_INT, default=1, metavar="N",
                        help="megatron: ranks per tensor-parallel group (only their first rank is read)")
    add_overwrite_argument(parser, "PROFILE_DIR")


def run(args: argparse.Namespace) -> int:
    options = IngestOptions(args.domain, args.lang, args.tags, args.coactivation, args.tensor_parallel)
    profile = ingest(args.format, args.files, args.model, args.out, options, args.overwrite)
    tokens = profile.summary()["tokens"]
    print(f"ingested {len(profile.prompts)} requests ({tokens['prefill']} prefill and {tokens['generation']} "
          f"generation tokens, {len(profile.layers)} MoE layers) into {args.out}")
    for name, why in sorted(profile.absent.items()):
        print(f"  absent: {name} ({why})")
    return 0
