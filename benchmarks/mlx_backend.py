"""The MLX backend against torch: how often it chooses other experts for the same tokens, and its speed.

Each checkpoint (tiny random models of several families, and the embedded demo model) is loaded by
both backends in the same dtype, the same prompts go through both with routing captured, and every
(token, MoE layer) whose set of chosen experts differs is counted. In float32 the two must agree
exactly (a capture error shows as a large share); in bfloat16 they round differently, so a few
percent differ, about as many as bfloat16 against float32 within one framework (printed too). Then,
on the demo model, the prefill time of torch and of MLX, and MLX's time with capture / without (best
of `--repeats`, alternating; target <= 1.05, as for torch).

    python benchmarks/mlx_backend.py [--families qwen3_moe,olmoe,...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moescope.backends.select import open_model, routing_capture
from moescope.calibration import ASSETS, DEMO_MODEL, load_calibration
from moescope.models.tiny import tiny_model

FAMILIES = "qwen3_moe,olmoe,mixtral,deepseek_v3,glm4_moe,qwen2_moe,qwen3_next"


def choices(model, batches) -> list[torch.Tensor]:
    """The sorted expert ids of every (token, layer), batch by batch."""
    chosen = []
    with routing_capture(model, on_event=lambda e: chosen.append(e.expert_ids.sort(-1).values)):
        for ids in batches:
            model(input_ids=ids)
    return chosen


def differing(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[int, int]:
    moved = torch.cat([(x != y).any(-1) for x, y in zip(a, b, strict=True)])
    return int(moved.sum()), len(moved)


def demo_batches(count: int = 24, length: int = 128) -> list[torch.Tensor]:
    tokenizer = Tokenizer.from_file(str(DEMO_MODEL / "tokenizer.json"))
    prompts = [p for p in load_calibration(ASSETS / "calibration.jsonl") if p.text][:count]
    return [torch.tensor([tokenizer.encode(p.text).ids[:length]]) for p in prompts]


def compare(directory: Path, batches, name: str) -> None:
    runs = {(backend, dtype): choices(open_model(directory, backend, dtype=dtype), batches)
            for backend in ("hf", "mlx") for dtype in ("float32", "bfloat16")}
    cells = []
    for label, a, b in (("torch vs mlx, float32", ("hf", "float32"), ("mlx", "float32")),
                        ("torch vs mlx, bfloat16", ("hf", "bfloat16"), ("mlx", "bfloat16")),
                        ("torch f32 vs bf16", ("hf", "float32"), ("hf", "bfloat16")),
                        ("mlx f32 vs bf16", ("mlx", "float32"), ("mlx", "bfloat16"))):
        moved, total = differing(runs[a], runs[b])
        cells.append(f"{label}: {moved}/{total} = {moved / total:.2%}")
    print(f"{name:<12} " + "; ".join(cells))


def best_time(run, repeats: int) -> list[float]:
    """Best wall time of each callable in `run`, alternating them `repeats` times (after one warm-up each)."""
    import mlx.core as mx

    def timed(call) -> float:
        start = time.perf_counter()
        call()
        mx.synchronize()
        return time.perf_counter() - start

    for call in run:
        timed(call)
    times = [[timed(call) for call in run] for _ in range(repeats)]
    return [min(column) for column in zip(*times)]


def speed(directory: Path, batches, repeats: int) -> None:
    """Prefill time of torch, of MLX, and of MLX with capture, on the same batches."""
    hf, mlx = open_model(directory, "hf", dtype="float32"), open_model(directory, "mlx", dtype="float32")

    def forward(model, capture: bool):
        def call():
            with torch.no_grad(), routing_capture(model, on_event=lambda e: None) if capture else nullcontext():
                for ids in batches:
                    model(input_ids=ids)
        return call

    torch_s, mlx_s, captured_s = best_time([forward(hf, False), forward(mlx, False), forward(mlx, True)], repeats)
    tokens = sum(ids.numel() for ids in batches)
    print(f"prefill of {tokens} tokens, best of {repeats}: torch {torch_s * 1000:.0f} ms, mlx {mlx_s * 1000:.0f} ms "
          f"(mlx / torch time {mlx_s / torch_s:.2f}); MLX with capture / without: {captured_s / mlx_s:.3f} "
          "(target <= 1.05)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=FAMILIES)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = [torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            tiny_model(family).save_pretrained(Path(tmp) / family)
            compare(Path(tmp) / family, batches, family)
    compare(DEMO_MODEL, demo_batches(), "demo model")
    prefill = [torch.randint(3, 8192, (4, 128), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    speed(DEMO_MODEL, prefill, args.repeats)


if __name__ == "__main__":
    main()
