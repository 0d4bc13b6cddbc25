"""Profiling on Ray on this machine: prompts/s with 2 workers / 1 worker (each worker 1 CPU), and the Ray
path with 1 worker (2 CPUs) / the local profiler (2 threads; target >= 0.9). Prints both ratios.

    python benchmarks/ray_scaling.py [--prompts 218] [--hidden 384] [--layers 8] [--generate 0]

The model is a random Qwen3-MoE larger than the demo model (hidden --hidden, --layers layers, 64
experts top-4) with the demo model's tokenizer, saved to a temporary checkpoint that Ray tasks load
as a cluster would; the prompts are the embedded calibration set. Every timing covers loading the
model from disk and profiling, so the Ray figures include what a task costs (a worker process
importing torch and loading weights); starting Ray itself is printed apart, since a cluster is
started once for many runs. The local profiler runs in a fresh subprocess, like a Ray worker.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moescope.calibration import CALIBRATION, DEMO_MODEL, load_calibration
from moescope.models.tiny import tiny_model
from moescope.profiling.ray_run import ClusterOptions, import_ray, profile_on_ray
from moescope.profiling.run import ProfileOptions

LOCAL = """
import sys, time, torch
from moescope.backends.hf.loading import load_model, load_tokenizer
from moescope.calibration import load_calibration
from moescope.profiling.run import ProfileOptions, profile_model
torch.set_num_threads(2)
start = time.perf_counter()
model_dir, calibration, out, generate, max_tokens = sys.argv[1:6]
profile_model(load_model(model_dir), load_tokenizer(model_dir), load_calibration(calibration), out,
              ProfileOptions(generate=int(generate), max_tokens=int(max_tokens), progress=False))
print(time.perf_counter() - start)
"""


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
    parser.add_argument("--prompts", type=int, default=218)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--generate", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    ray = import_ray()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = checkpoint(tmp / "model", args.hidden, args.layers)
        lines = CALIBRATION.read_text(encoding="utf-8").splitlines()[: args.prompts]
        (tmp / "cal.jsonl").write_text("\n".join(lines) + "\n")
        prompts = load_calibration(tmp / "cal.jsonl")
        options = ProfileOptions(generate=args.generate, max_tokens=args.max_tokens, progress=False)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"Ray start (once per cluster, not counted below): {time.perf_counter() - start:.1f} s")

        def on_ray(name: str, workers: int, cpus: float) -> float:
            start = time.perf_counter()
            profile_on_ray(model_dir, prompts, tmp / name, options, ClusterOptions(workers, cpus_per_worker=cpus))
            return len(prompts) / (time.perf_counter() - start)

        local_seconds = float(subprocess.run(
            [sys.executable, "-c", LOCAL, str(model_dir), str(tmp / "cal.jsonl"), str(tmp / "local"),
             str(args.generate), str(args.max_tokens)], capture_output=True, text=True, check=True).stdout)
        local = len(prompts) / local_seconds
        one_wide = on_ray("one-wide", 1, 2)
        one = on_ray("one", 1, 1)
        two = on_ray("two", 2, 1)
        ray.shutdown()
    print(f"{len(prompts)} prompts; local profiler (2 threads): {local:.2f} prompts/s; Ray 1 worker x 2 CPUs: "
          f"{one_wide:.2f}; Ray 1 worker x 1 CPU: {one:.2f}; Ray 2 workers x 1 CPU: {two:.2f}")
    print(f"2 workers / 1 worker: {two / one:.2f} (2 cores: at most 2)")
    print(f"Ray 1 worker / local profiler, same 2 CPUs: {one_wide / local:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
