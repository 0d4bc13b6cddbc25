"""Do two placements of one model choose the same experts? The share of (token, MoE layer) choices
whose set of top-k experts differs between them, on the embedded demo model over the held-out sets.

    python benchmarks/device_agreement.py                  # bfloat16 vs float32, both on the CPU
    python benchmarks/device_agreement.py --device cuda    # and float32 on the GPU vs the CPU, bf16 vs fp32 there

Every pair runs the same windows (the `evaluate` protocol: 256-token windows, 16 per domain and
language) through `capture_routing`. A share of 0 means the profiles count the same selections.
bf16 changes the router's inputs (every layer below runs in bf16), so near-ties flip; float32 on
two devices differs only by the order of floating-point sums.
"""

from __future__ import annotations

import argparse

import torch

from moescope.backends.hf.capture import capture_routing
from moescope.backends.hf.loading import Placement, input_device, load_model, load_tokenizer
from moescope.calibration import DEMO_MODEL, HELDOUT
from moescope.judge.evaluate import Protocol, load_windows


@torch.inference_mode()
def choices(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Sorted expert ids of every (window token, MoE layer), [tokens, layers, k], on the CPU."""
    per_batch = []
    for start in range(0, len(windows), batch_size):
        with capture_routing(model) as rec:
            model(input_ids=windows[start:start + batch_size].to(input_device(model)))
        per_batch.append(torch.stack([e.expert_ids.sort(-1).values.cpu() for e in rec.events], dim=1))
    return torch.cat(per_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to compare the GPU with the CPU too")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=16, help="windows per domain and language")
    args = parser.parse_args()
    torch.set_num_threads(1)
    windows = torch.cat(list(load_windows(HELDOUT, load_tokenizer(args.model),
                                          Protocol(seq_len=args.seq_len, sequences=args.sequences)).values()))
    placements = {("cpu", "float32"), ("cpu", "bfloat16"), (args.device, "float32"), (args.device, "bfloat16")}
    routed = {where: choices(load_model(args.model, Placement(*where)), windows) for where in sorted(placements)}
    tokens, layers, k = routed["cpu", "float32"].shape
    print(f"{args.model}: {tokens:,} tokens x {layers} MoE layers, top-{k}; "
          f"TF32 matmuls {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    pairs = [(("cpu", "bfloat16"), ("cpu", "float32"))]
    if args.device != "cpu":
        pairs += [((args.device, "float32"), ("cpu", "float32")), ((args.device, "bfloat16"), (args.device, "float32")),
                  ((args.device, "bfloat16"), ("cpu", "bfloat16"))]
    for a, b in pairs:
        differ = (routed[a] != routed[b]).any(-1)
        print(f"{' '.join(a):>16} vs {' '.join(b):<16} token-layer choices that differ: {differ.float().mean():.2%} "
              f"({int(differ.sum()):,} of {differ.numel():,}); per layer: "
              + ", ".join(f"{share:.2%}" for share in differ.float().mean(0).tolist()))


if __name__ == "__main__":
    main()
