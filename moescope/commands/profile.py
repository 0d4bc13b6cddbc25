"""`moescope profile MODEL_DIR --calibration FILE --out PROFILE_DIR`: count which experts fire.

Runs the model over a tagged calibration set (prefill, then optionally greedy decoding) and keeps
counters per layer, expert, domain, language and phase (moescope.profiling.run). `--trace` also
streams every (token, layer, rank) record to Parquet; `--resume` continues an interrupted run.
`--workers N` runs shards of the set as Ray tasks (moescope.profiling.ray_run; needs moescope[ray]).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moescope.backends.hf.loading import load_tokenizer
from moescope.backends.select import open_model
from moescope.calibration import load_calibration
from moescope.commands.common import (
    NONNEGATIVE_INT,
    POSITIVE_INT,
    add_backend_argument,
    add_overwrite_argument,
    add_placement_arguments,
    placement_from_args,
)
from moescope.errors import MoescopeError
from moescope.output import FILE
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import PROFILE

OUTPUTS = {"out": PROFILE, "trace": FILE}
INPUTS = ("model", "calibration")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="local Hugging Face or mlx-lm checkpoint directory")
    parser.add_argument("--calibration", required=True, metavar="FILE", help="calibration set (JSONL)")
    parser.add_argument("--out", required=True, metavar="PROFILE_DIR", help="directory to write the profile to")
    parser.add_argument("--generate", type=NONNEGATIVE_INT, default=0, metavar="N",
                        help="greedy-decode N new tokens per prompt and profile them as the generation phase")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    parser.add_argument("--max-tokens", type=NONNEGATIVE_INT, default=2048,
                        help="cap on tokens per prompt (default 2048; 0: none); never more than the model's context "
                        "minus --generate")
    parser.add_argument("--domains", help="comma-separated domains to profile (default: all)")
    add_placement_arguments(parser)
    add_backend_argument(parser)
    parser.add_argument("--coactivation", action="store_true", help="count expert pairs chosen together")
    parser.add_argument("--saliency", action="store_true",
                        help="sum routing weight x expert output norm (REAP); costs one extra pass of the experts")
    parser.add_argument("--no-prompt-counts", action="store_true",
                        help="do not keep per-prompt selection counts (4 bytes per prompt x layer x expert); "
                             "`stats` then gives no intervals for entropy ratio, Gini and top-n share")
    parser.add_argument("--trace", metavar="FILE.parquet", help="also write every routing record to Parquet")
    parser.add_argument("--checkpoint-every", type=POSITIVE_INT, default=20, metavar="BATCHES",
                        help="save the counters every this many batches, for --resume")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run into PROFILE_DIR")
    add_overwrite_argument(parser, "PROFILE_DIR and the trace")
    cluster = parser.add_argument_group("Ray (needs moescope[ray]; without --workers Ray is not used)")
    cluster.add_argument("--workers", type=POSITIVE_INT, metavar="N",
                         help="profile shards of the set as N Ray tasks at a time and merge them (MODEL_DIR must be "
                         "a path every node sees); the profile equals a one-process run's")
    cluster.add_argument("--ray-address", metavar="HOST:PORT",
                         help="the Ray cluster's head node (default: start Ray on this machine)")
    cluster.add_argument("--cpus-per-worker", type=float, default=1, metavar="N",
                         help="CPUs Ray reserves for each task, and the threads torch uses in it (default 1)")
    cluster.add_argument("--gpus-per-worker", type=float, default=0, metavar="N",
                         help="GPUs Ray reserves for each task (default 0; e.g. 8 for a model that fills a node)")


def run(args: argparse.Namespace) -> int:
    if args.ray_address and args.workers is None:
        raise MoescopeError("--ray-address needs --workers N (how many shards run at once)")
    if args.workers is not None and args.backend == "mlx":
        raise MoescopeError("--workers runs transformers models on Ray: use --backend hf (or auto) with it")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    prompts = load_calibration(args.calibration, domains)
    out, placement = Path(args.out), placement_from_args(args)
    options = ProfileOptions(args.generate, args.batch_size, args.max_tokens or None, args.coactivation,
                             args.saliency, not args.no_prompt_counts, args.trace, args.checkpoint_every,
                             args.resume, args.overwrite)
    try:
        if args.workers is not None:
            from moescope.profiling.ray_run import ClusterOptions, profile_on_ray

            cluster = ClusterOptions(args.workers, args.ray_address, args.cpus_per_worker, args.gpus_per_worker)
            profile = profile_on_ray(args.model, prompts, out, options, cluster, placement)
        else:
            model = open_model(args.model, args.backend, placement)
            profile = profile_model(model, load_tokenizer(args.model), prompts, out, options)
    except KeyboardInterrupt:  # the CLI says "interrupted" and this, and exits 130
        raise KeyboardInterrupt("rerun with --resume to continue from the last checkpoint") from None
    tokens = profile.summary()["tokens"]
    print(f"profiled {len(profile.prompts)} prompts ({tokens['prefill']} prefill and {tokens['generation']} "
          f"generation tokens, {len(profile.layers)} MoE layers) into {out}")
    return 0


