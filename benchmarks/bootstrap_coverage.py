"""How often the bootstrap intervals of entropy ratio, Gini and top-n ratio cover the truth.

Prompts are drawn from a known population: each prompt routes with its own expert mix, a Dirichlet
around a skewed layer popularity (`--spread`: lower = prompts differ more), over 50-400 tokens x
top-8. The truth is the metric of the pooled counts of 20 000 prompts. For each scenario the script
draws `--trials` calibration sets, computes the 95 % basic interval (what `moescope stats` reports)
and the plain percentile interval, and prints the share of (set, layer) intervals that cover the
truth, with the ratio to the nominal 95 %.

    .venv/bin/python benchmarks/bootstrap_coverage.py [--trials 100]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from moescope.analysis.balance import balance, bootstrap_balance
from moescope.analysis.uncertainty import basic_interval, percentile_interval

KEYS = ("entropy_ratio", "gini", "top_ratio")
SCENARIOS = ((32, 30, 30), (64, 30, 30), (32, 100, 30), (32, 30, 300), (32, 30, 3))  # experts, prompts, spread


def coverage(experts: int, prompts: int, spread: float, trials: int, layers: int = 4, seed: int = 0,
             population: int = 20000) -> dict:
    """{key: (basic, percentile)} share of intervals that contain the population value."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(experts, 0.5), size=layers)

    def draw(n):
        mix = np.stack([rng.dirichlet(p * spread, size=n) for p in popularity], 1)
        return np.stack([[rng.multinomial(int(t) * 8, row) for row in rows]
                         for rows, t in zip(mix, rng.integers(50, 400, n), strict=True)]).astype(np.uint32)

    widths = np.full(layers, experts)
    truth = balance(draw(population).sum(0).astype(float), widths, 0.1)
    hits = {key: np.zeros(2) for key in KEYS}
    for _ in range(trials):
        counts = draw(prompts)
        point = balance(counts.sum(0).astype(float), widths, 0.1)
        samples = bootstrap_balance(counts, widths, 0.1, 200, rng)
        for key in KEYS:
            for i, (lo, hi) in enumerate((basic_interval(point[key], samples[key]), percentile_interval(samples[key]))):
                hits[key][i] += ((lo <= truth[key]) & (truth[key] <= hi)).sum()
    return {key: tuple(value / (trials * layers)) for key, value in hits.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--population", type=int, default=20000, help="prompts whose pooled counts are the truth")
    args = parser.parse_args()
    print("experts prompts spread | coverage basic (percentile) per metric; nominal 0.95")
    worst = 1.0
    for experts, prompts, spread in SCENARIOS:
        result = coverage(experts, prompts, spread, args.trials, population=args.population)
        worst = min(worst, *(basic for basic, _ in result.values()))
        print(f"{experts:7d} {prompts:7d} {spread:6g} | " + "  ".join(
            f"{key} {basic:.2f} ({percentile:.2f})" for key, (basic, percentile) in result.items()))
    print(f"worst basic coverage {worst:.2f} = {worst / 0.95:.2f} x nominal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
