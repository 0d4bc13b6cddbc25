"""Where profiling's time goes: the torch profiler over plain forward passes and `profile_model` on
the same prompts, counting operator calls (each a kernel launch on a GPU), host reads of device
values and the other calls that make the host wait, and the busiest operators.

    python benchmarks/profile_breakdown.py                   # CPU
    python benchmarks/profile_breakdown.py --device cuda     # adds synchronisations, copies, launches

A random Qwen3-MoE the size of the demo model (hidden 128, 4 layers, 16 experts top-2), 16 prompts
of 128-256 tokens, batch 8 (profile_overhead.py's demo shape, prompts and plain passes). It uses
only APIs every moescope version has (`tiny_model`, `profile_model`), so it can measure an older
checkout too: `PYTHONPATH=OLD_CHECKOUT python benchmarks/profile_breakdown.py`.
Counts are per run of all 16 prompts; times are indicative (one run, after a warm-up).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from profile_overhead import SHAPES, IdTokenizer, make_prompts, plain
from torch.profiler import ProfilerActivity, profile

from moescope.models.tiny import tiny_model
from moescope.profiling.run import ProfileOptions, profile_model

WAITS = {"aten::_local_scalar_dense": "host reads", "aten::nonzero": "nonzero", "aten::bincount": "bincount",
         "aten::is_nonzero": "bool()", "cudaStreamSynchronize": "stream syncs", "cudaDeviceSynchronize": "device syncs",
         "cudaMemcpyAsync": "copies", "cudaMemcpy": "copies", "cudaLaunchKernel": "kernel launches",
         "cudaLaunchKernelExC": "kernel launches", "cuLaunchKernel": "kernel launches",
         "cuLaunchKernelEx": "kernel launches"}


def measured(run, activities, device):
    run()  # warm-up
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    counts: dict[str, int] = {}
    for event in events:
        if event.key in WAITS:
            counts[WAITS[event.key]] = counts.get(WAITS[event.key], 0) + event.count
    cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    device_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
    print(f"  op calls {sum(e.count for e in events):>7,}  self CPU {cpu_ms:6.0f} ms"
          + (f"  self GPU {device_ms:6.0f} ms" if device.type == "cuda" else "") + "  "
          + ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items())))
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--generate", type=int, default=16)
    parser.add_argument("--top", type=int, default=10, help="busiest operators shown for the last run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model = tiny_model("qwen3_moe", **SHAPES["demo"][0]).to(device)
    prompts = make_prompts(16, 256, model.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in (("prefill", {}), ("prefill, co-activation, saliency", dict(coactivation=True,
                                                                                       saliency=True)),
                               (f"{args.generate} generated tokens", dict(generate=args.generate))):
            print(f"{label}:")
            settings = ProfileOptions(batch_size=8, max_tokens=None, progress=False, overwrite=True, **options)
            print("  plain  ", end="")
            measured(lambda s=settings: plain(model, prompts, 8, s.generate), activities, device)
            print("  profile", end="")
            events = measured(lambda s=settings: profile_model(model, IdTokenizer(), prompts, Path(tmp) / "p", s),
                              activities, device)
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=36))


if __name__ == "__main__":
    main()
