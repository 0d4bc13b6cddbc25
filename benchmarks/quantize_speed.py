"""Fake-quantisation throughput and error: minmax against MSE-searched scales.

Quantises a stack of random Gaussian expert matrices (the fused [experts, out, in] layout) at each
width, as `moescope quantize` does, best of a few rounds, and prints the MSE search's time and
squared error as ratios to minmax's, measured in the same run.

    .venv/bin/python benchmarks/quantize_speed.py [--experts 64 --out 1024 --in 2048 --rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from moescope.compress.quant.kernels import fake_quantize


def timed(w: torch.Tensor, bits: int, scales: str, rounds: int) -> tuple[float, float]:
    """(best seconds, squared error) of quantising `w`."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        q = fake_quantize(w, bits, 128, True, scales)
        best = min(best, time.perf_counter() - start)
    return best, (q.float() - w.float()).square().sum().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--out", type=int, default=1024)
    ap.add_argument("--in", dest="inputs", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    w = torch.randn(args.experts, args.out, args.inputs, dtype=torch.bfloat16)
    print(f"{w.numel() / 1e6:.0f} M bf16 weights, group size 128, {torch.get_num_threads()} threads")
    for bits in (2, 3, 4, 8):
        (minmax, minmax_error), (mse, mse_error) = (timed(w, bits, scales, args.rounds) for scales in ("minmax", "mse"))
        print(f"{bits} bits: minmax {w.numel() / minmax / 1e6:.0f} M weights/s, mse {w.numel() / mse / 1e6:.1f} M "
              f"weights/s; mse / minmax: time {mse / minmax:.1f}, squared error {mse_error / minmax_error:.3f}")


if __name__ == "__main__":
    main()
