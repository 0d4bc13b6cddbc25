"""Profiling on Ray on this machine: prompts/s with 2 workers / 1 worker (1 CPU each), and the Ray path
with 1 worker / the local profiler on the same 2 CPUs (target >= 0.9). Prints the ratios.

    python benchmarks/ray_scaling.py [--prompts 218] [--hidden 256] [--layers 4] [--max-tokens 128]

The model is a random Qwen3-MoE larger than the demo model (hidden --hidden, --layers layers, 64
experts top-4) with the demo model's tokenizer, saved to a temporary checkpoint that Ray tasks load
as a cluster's would; the prompts are the embedded calibration set. Each configuration runs twice:
"cold" (worker processes start, import torch and load the model: a fixed cost per run and node) and
"warm" (the workers kept the model from the cold run: the per-prompt cost of sharding, progress
reports and merging, which is what a long run pays). The local profiler runs in a fresh subprocess
with 2 threads; its time excludes loading the model, like the warm runs. Starting Ray is printed
apart: a cluster is started once for many runs.
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
model_dir, calibration, out, max_tokens = sys.argv[1:5]
start = time.perf_counter()
model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
loaded = time.perf_counter()
profile_model(model, tokenizer, load_calibration(calibration), out,
              ProfileOptions(max_tokens=int(max_tokens), progress=False))
print(loaded - start, time.perf_counter() - loaded)
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
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    ray = import_ray()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = checkpoint(tmp / "model", args.hidden, args.layers)
        lines = CALIBRATION.read_text(encoding="utf-8").splitlines()[: args.prompts]
        (tmp / "cal.jsonl").write_text("\n".join(lines) + "\n")
        prompts = load_calibration(tmp / "cal.jsonl")
        options = ProfileOptions(max_tokens=args.max_tokens, progress=False, overwrite=True)
        load_s, local_s = map(float, subprocess.run(
            [sys.executable, "-c", LOCAL, str(model_dir), str(tmp / "cal.jsonl"), str(tmp / "local"),
             str(args.max_tokens)], capture_output=True, text=True, check=True).stdout.split())
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"Ray start (once per cluster, not counted below): {time.perf_counter() - start:.1f} s")

        def rate(workers: int, cpus: float) -> float:
            start = time.perf_counter()
            profile_on_ray(model_dir, prompts, tmp / "ray", options, ClusterOptions(workers, cpus_per_worker=cpus))
            return len(prompts) / (time.perf_counter() - start)

        wide_cold, wide_warm = rate(1, 2), rate(1, 2)
        one_cold, one_warm = rate(1, 1), rate(1, 1)
        two_cold, two_warm = rate(2, 1), rate(2, 1)
        ray.shutdown()
    local = len(prompts) / local_s
    print(f"{len(prompts)} prompts of at most {args.max_tokens} tokens, hidden {args.hidden}, {args.layers} layers")
    print(f"local profiler, 2 threads: {local:.2f} prompts/s (loading the model took {load_s:.1f} s more)")
    print(f"Ray, prompts/s cold / warm: 1 worker x 2 CPUs {wide_cold:.2f} / {wide_warm:.2f}; 1 worker x 1 CPU "
          f"{one_cold:.2f} / {one_warm:.2f}; 2 workers x 1 CPU {two_cold:.2f} / {two_warm:.2f}")
    print(f"2 workers / 1 worker: {two_warm / one_warm:.2f} warm, {two_cold / one_cold:.2f} cold (2 cores: at most 2)")
    print(f"Ray 1 worker / local profiler, same 2 CPUs: {wide_warm / local:.2f} warm (target >= 0.9), "
          f"{wide_cold / local:.2f} cold")


if __name__ == "__main__":
    main()
