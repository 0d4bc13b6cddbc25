"""Profiling on Ray on this machine: prompts/s with 2 workers / 1 worker, and the Ray path with 1 worker /
the local profiler (target >= 0.9). Prints the ratios.

    python benchmarks/ray_scaling.py [--prompts 96] [--hidden 256] [--layers 4] [--max-tokens 128] [--rounds 3]

The model is a random Qwen3-MoE larger than the demo model (hidden --hidden, --layers layers, 64
experts top-4) with the demo model's tokenizer, saved to a temporary checkpoint that Ray tasks load
as a cluster's would; the prompts are the embedded calibration set. Every worker and the local
profiler use one torch thread (on a shared 2-core machine, two threads per process only spin
against other jobs). Each Ray configuration first runs cold (worker processes start, import torch
and load the model: a fixed cost per run and node), then `--rounds` times warm (the workers kept the
model: the per-prompt cost of sharding, progress reports and merging, which is what a long run pays),
alternating with the local profiler (model already loaded) so that load from other jobs hits all
alike; the best round of each counts. Starting Ray is printed apart: a cluster starts once.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moescope.backends.hf.loading import load_model, load_tokenizer
from moescope.calibration import CALIBRATION, DEMO_MODEL, load_calibration
from moescope.models.tiny import tiny_model
from moescope.profiling.ray_run import ClusterOptions, import_ray, profile_on_ray
from moescope.profiling.run import ProfileOptions, profile_model


def checkpoint(directory: Path, hidden: int, layers: int) -> Path:
    model = tiny_model("qwen3_moe", hidden_size=hidden, num_hidden_layers=layers, num_experts=64,
                       num_experts_per_tok=4, moe_intermediate_size=hidden // 2, intermediate_size=hidden * 2,
                       vocab_size=8192, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
                       max_position_embeddings=256)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, directory / name)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ray = import_ray()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = checkpoint(tmp / "model", args.hidden, args.layers)
        lines = CALIBRATION.read_text(encoding="utf-8").splitlines()[: args.prompts]
        (tmp / "cal.jsonl").write_text("\n".join(lines) + "\n")
        prompts = load_calibration(tmp / "cal.jsonl")
        options = ProfileOptions(max_tokens=args.max_tokens, progress=False, overwrite=True)
        model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"Ray start (once per cluster, not counted below): {time.perf_counter() - start:.1f} s")

        def timed(run) -> float:
            start = time.perf_counter()
            run()
            return len(prompts) / (time.perf_counter() - start)

        def on_ray(workers: int):
            return lambda: profile_on_ray(model_dir, prompts, tmp / "ray", options, ClusterOptions(workers))

        def local():
            profile_model(model, tokenizer, prompts, tmp / "local", options)

        cold = {workers: timed(on_ray(workers)) for workers in (1, 2)}
        rates: dict[str, list[float]] = {"local": [], "one": [], "two": []}
        for _ in range(args.rounds):
            rates["local"].append(timed(local))
            rates["one"].append(timed(on_ray(1)))
            rates["two"].append(timed(on_ray(2)))
        ray.shutdown()
    best = {name: max(values) for name, values in rates.items()}
    print(f"{len(prompts)} prompts of at most {args.max_tokens} tokens, hidden {args.hidden}, {args.layers} layers, "
          "1 thread per process")
    print(f"prompts/s, best of {args.rounds} warm rounds: local profiler {best['local']:.2f}, Ray 1 worker "
          f"{best['one']:.2f}, Ray 2 workers {best['two']:.2f}; cold (workers start and load the model): 1 worker "
          f"{cold[1]:.2f}, 2 workers {cold[2]:.2f}")
    print(f"2 workers / 1 worker: {best['two'] / best['one']:.2f} (2 shared cores: at most 2)")
    print(f"Ray 1 worker / local profiler: {best['one'] / best['local']:.2f} warm (target >= 0.9), "
          f"{cold[1] / best['local']:.2f} cold")


if __name__ == "__main__":
    main()
