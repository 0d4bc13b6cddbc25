"""Options several verbs share, defined once: where a model runs, number ranges, --overwrite, tier
thresholds, the statistics, the evaluation protocol."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from moescope.analysis.analyse import StatsOptions
from moescope.analysis.criteria import CRITERIA
from moescope.analysis.tiers import TierOptions
from moescope.backends.hf.loading import MODEL_DTYPES, Placement, parse_max_memory
from moescope.backends.select import BACKENDS
from moescope.calibration import HELDOUT
from moescope.errors import MoescopeError
from moescope.judge.evaluate import Protocol


def bounded(kind: type = int, low: float | None = None, high: float | None = None,
            open_low: bool = False, open_high: bool = False) -> Callable[[str], float]:
    """An argparse `type=` for a finite number of `kind` between `low` and `high` (either end left out
    when None, excluded when open), whose error says the range: `--group-size 0` is refused at the
    command line, not deep inside the run."""
    noun = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        wanted = f"{noun} in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low is not None:
        wanted = f"{noun} {'>' if open_low else '>='} {low:g}"
    else:
        wanted = f"a finite {noun.removeprefix('a ').removeprefix('an ')}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        outside = (isinstance(value, float) and not math.isfinite(value)
                   or low is not None and (value <= low if open_low else value < low)
                   or high is not None and (value >= high if open_high else value > high))
        if outside:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {wanted}")
        return value

    return parse


def list_of(item: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse `type=` for comma-separated values, each parsed (and range-checked) by `item`."""
    def parse(text: str) -> list:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least one value")
        return values

    return parse


POSITIVE_INT, NONNEGATIVE_INT = bounded(int, 1), bounded(int, 0)
FINITE = bounded(float)
SHARE = bounded(float, 0, 1, open_high=True)  # a share of experts to prune: 0 <= r < 1


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str = "the output") -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} if it exists (only ever one that moescope wrote; never an input)")


def add_tier_arguments(parser: argparse.ArgumentParser) -> None:
    """Tier thresholds and bits, shared by `stats`, `report` and `plan tiers`."""
    defaults = TierOptions()
    parser.add_argument("--critical", type=float, default=defaults.critical,
                        help="critical tier: load at least this x the fair share 1/E")
    parser.add_argument("--standard", type=float, default=defaults.standard, help="standard tier threshold (x 1/E)")
    parser.add_argument("--prune-below", type=float, default=defaults.prune, help="prune tier: below this x 1/E")
    parser.add_argument("--tier-bits", default=",".join(map(str, defaults.bits)),
                        help="bits for critical,standard,deprioritised,prune (0 = remove)")
    parser.add_argument("--criterion", choices=list(CRITERIA), default=defaults.criterion,
                        help="score behind the load ratio")


def tier_options(args: argparse.Namespace) -> TierOptions:
    try:
        bits = tuple(int(b) for b in args.tier_bits.split(","))
    except ValueError:
        raise MoescopeError(f"--tier-bits {args.tier_bits!r}: write four integers, e.g. 8,4,2,0") from None
    return TierOptions(args.critical, args.standard, args.prune_below, bits, args.criterion).check()


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the analysis, shared by `stats` and `report`."""
    parser.add_argument("profile", metavar="PROFILE", help="profile directory from `moescope profile`")
    defaults = StatsOptions()
    parser.add_argument("--near-dead", type=float, default=defaults.near_dead,
                        help="near-dead: chosen, but below this x the fair share 1/E")
    parser.add_argument("--coverage", type=float, default=defaults.coverage,
                        help="target share of live experts for the prompts-needed estimate")
    parser.add_argument("--bootstrap", type=int, default=defaults.bootstrap, help="bootstrap resamples")
    parser.add_argument("--orderings", type=int, default=defaults.orderings,
                        help="random prompt orderings for the sample-size curve")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_tier_arguments(parser)


def stats_options(args: argparse.Namespace) -> StatsOptions:
    return StatsOptions(near_dead=args.near_dead, coverage=args.coverage, bootstrap=args.bootstrap,
                        orderings=args.orderings, seed=args.seed, tiers=tier_options(args)).check()


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Protocol()
    parser.add_argument("--data", default=str(HELDOUT),
                        help="evaluation JSONL file or directory (default: the embedded held-out sets)")
    parser.add_argument("--seq-len", type=bounded(int, 2), default=defaults.seq_len,
                        help="tokens per window (clipped to context; at least 2: the first token is never predicted)")
    parser.add_argument("--sequences", type=POSITIVE_INT, default=defaults.sequences,
                        help="windows per domain and language")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for choosing windows")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=defaults.batch_size)
    add_placement_arguments(parser, defaults.placement.dtype, defaults.placement.dtype)


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    return Protocol(args.seq_len, args.sequences, args.seed, args.batch_size, placement_from_args(args),
                    getattr(args, "backend", "auto"), getattr(args, "baseline_backend", "auto"))


def add_backend_argument(parser: argparse.ArgumentParser, flag: str = "--backend", what: str = "MODEL_DIR") -> None:
    """Which framework runs a checkpoint (moescope.backends.select)."""
    parser.add_argument(flag, choices=BACKENDS, default="auto",
                        help=f"run {what} with transformers (hf) or mlx-lm (mlx; needs moescope[mlx]); auto (default): "
                        "mlx for mlx-lm's converted layout, else hf")


def add_placement_arguments(parser: argparse.ArgumentParser, dtype: str | None = None,
                            dtype_help: str = "the checkpoint's own") -> None:
    """--device, --dtype and --max-memory, with one meaning on every verb that runs a model
    (moescope.backends.hf.loading); `dtype` is this verb's default."""
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda, cuda:N, or auto: accelerate's device map over every visible GPU "
                        "and then the CPU (with --max-memory); under the mlx backend, auto is mlx's default device "
                        "(the GPU on Apple Silicon)")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default=dtype,
                        help=f"precision to run at (default: {dtype_help})")
    parser.add_argument("--max-memory", metavar="DEVICE=SIZE,...",
                        help="with --device auto: the most each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB "
                        "(devices left out get nothing); add `disk` to offload what does not fit to a temporary "
                        "folder (TMPDIR)")


def placement_from_args(args: argparse.Namespace) -> Placement:
    limits, disk = parse_max_memory(args.max_memory) if args.max_memory else (None, False)
    return Placement(args.device, args.dtype, limits, disk).check()
