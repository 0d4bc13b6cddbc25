"""Forward time with routing capture / without, in the same run (target <= 1.05).

Random Qwen3-MoE: 64 experts, top-8, 8 layers, hidden 256; batch of 8 x 256 tokens; CPU.
Runs alternate so drift on a noisy machine hits both sides alike, and the fastest run of each is
compared: interference from other processes only ever adds time, so the minimum is the most stable
estimate of what each side costs.

    python benchmarks/capture_overhead.py [--repeats 7 --layers 8 --tokens 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from moescope.backends.hf.capture import capture_routing
from moescope.models.tiny import tiny_model


def timed_forward(model, ids, mask) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per row of the batch of 8")
    args = parser.parse_args()
    model = tiny_model("qwen3_moe", num_experts=64, num_experts_per_tok=8, num_hidden_layers=args.layers,
                       hidden_size=256, moe_intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=32, vocab_size=1024)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 1024, (8, args.tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    timed_forward(model, ids, mask)  # warm-up
    plain, captured = [], []
    for _ in range(args.repeats):
        plain.append(timed_forward(model, ids, mask))
        with capture_routing(model, on_event=lambda event: None):
            captured.append(timed_forward(model, ids, mask))
    plain_s, captured_s = min(plain), min(captured)
    print(f"forward without capture: {plain_s * 1000:.1f} ms (best of {args.repeats})")
    print(f"forward with capture:    {captured_s * 1000:.1f} ms")
    print(f"capture overhead ratio: {captured_s / plain_s:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
