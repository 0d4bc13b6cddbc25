"""Checkpoint rewrite cost: peak memory / largest shard (target <= 1.5) and time / plain copy (target <= 2).

Builds a synthetic bf16 checkpoint of --size-gb split over 4 shards (a Qwen3-MoE-like key layout
with per-expert tensors), then in the same run: copies the files (the floor any rewrite pays),
and rewrites them with a `remove` prune plan in a child process whose peak RSS above its own
start-up RSS is measured.

    python benchmarks/rewrite.py [--size-gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys
from moescope.compress.prune import prune_checkpoint
from moescope.plans import PrunePlan
def rss_kb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
start = rss_kb()
plan = PrunePlan.from_json(json.loads(open(sys.argv[3]).read()))
prune_checkpoint(sys.argv[1], sys.argv[2], plan, 'remove')
print(json.dumps({'start_kb': start, 'peak_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def build(directory: Path, size_gb: float, layers: int = 8, experts: int = 16, hidden: int = 1024) -> dict:
    import torch
    from safetensors.torch import save_file

    expert_layers_bytes = size_gb * 2**30
    width = max(64, int(expert_layers_bytes / (layers * experts * 3 * hidden * 2)))
    names, weight_map, shards = [], {}, 4
    per_shard = (layers + shards - 1) // shards
    for shard in range(shards):
        tensors = {}
        for layer in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            prefix = f"model.layers.{layer}.mlp"
            tensors[f"{prefix}.gate.weight"] = torch.randn(experts, hidden, dtype=torch.bfloat16)
            for e in range(experts):
                for proj, shape in (("gate_proj", (width, hidden)), ("up_proj", (width, hidden)),
                                    ("down_proj", (hidden, width))):
                    tensors[f"{prefix}.experts.{e}.{proj}.weight"] = torch.randn(shape, dtype=torch.bfloat16)
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        names.append(name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": experts,
                                                       "num_experts_per_tok": 2, "num_hidden_layers": layers}))
    plan = {"format_version": 1, "kind": "prune_plan", "model": {"model_type": "qwen3_moe"}, "top_k": 2,
            "criterion": "benchmark", "source": {},
            "layers": [{"layer": i, "num_experts": experts, "prune": [0, 5]} for i in range(layers)]}
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        source = tmp / "source"
        source.mkdir()
        plan = build(source, args.size_gb)
        (tmp / "plan.json").write_text(json.dumps(plan))
        largest = max(p.stat().st_size for p in source.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in source.glob("*.safetensors"))

        start = time.perf_counter()
        shutil.copytree(source, tmp / "copy")
        copy_s = time.perf_counter() - start

        start = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", CHILD, str(source), str(tmp / "out"), str(tmp / "plan.json")],
                               capture_output=True, text=True, check=True)
        rewrite_s = time.perf_counter() - start
        memory = json.loads(child.stdout.strip().splitlines()[-1])
    peak_above_start = (memory["peak_kb"] - memory["start_kb"]) * 1024
    print(f"checkpoint: {total / 2**30:.2f} GiB in 4 shards, largest {largest / 2**20:.0f} MiB")
    print(f"plain copy {copy_s:.2f} s, rewrite {rewrite_s:.2f} s (includes the child's ~2 s of imports)")
    print(f"peak RSS above start-up: {peak_above_start / 2**20:.0f} MiB")
    print(f"peak memory / largest shard: {peak_above_start / largest:.2f} (target <= 1.5)")
    print(f"rewrite time / plain copy: {rewrite_s / copy_s:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
