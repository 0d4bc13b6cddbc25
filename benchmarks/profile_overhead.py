"""What profiling costs: tokens/s of `profile_model` vs plain batched forward passes over the same
prompts in the same process (target >= 0.95), and peak memory growth when the token count grows
10x with trace off (target < 5 %). Prints both ratios.

    python benchmarks/profile_overhead.py [--model DIR] [--prompts 128] [--tokens 256] [--batch-size 8]

Without --model it uses a random Qwen3-MoE the size of the demo model (hidden 128, 4 layers,
16 experts top-2, expert width 64, 8k vocabulary). Prompts are random token ids; the rounds
alternate plain / profiled so that load from other jobs hits both alike, and the best round of
each counts, by wall clock and by this process's CPU time (steadier on shared machines). Peak
memory is the peak RSS of a fresh subprocess per token count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moescope.calibration import Prompt
from moescope.models.tiny import tiny_model
from moescope.profiling.run import ProfileOptions, profile_model


class IdTokenizer:
    """Tokenises "12 7 99" as [12, 7, 99]: the prompts are random ids already."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}


def load(model_dir: str | None):
    if model_dir:
        from moescope.backends.hf.loading import load_model

        return load_model(model_dir, dtype="float32")
    return tiny_model("qwen3_moe", hidden_size=128, num_hidden_layers=4, num_experts=16, moe_intermediate_size=64,
                      intermediate_size=256, vocab_size=8192, num_attention_heads=4, head_dim=32)


def make_prompts(count: int, tokens: int, vocab: int, seed: int = 0) -> list[Prompt]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(tokens // 2, tokens + 1, (count,), generator=generator)
    domains = ("prose", "math", "code", "chat")
    return [Prompt(f"p{i}", domains[i % 4], ("en", "de", "zh")[i % 3],
                   " ".join(map(str, torch.randint(0, vocab, (int(n),), generator=generator).tolist())))
            for i, n in enumerate(lengths)]


@torch.inference_mode()
def plain(model, prompts: list[Prompt], batch_size: int) -> int:
    """The same left-padded batches the profiler runs, without hooks; returns tokens."""
    tokenizer, tokens = IdTokenizer(), 0
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p.text)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              use_cache=False, logits_to_keep=1)
        tokens += int(mask.sum())
    return tokens


def profiled(model, prompts: list[Prompt], batch_size: int, out: Path) -> int:
    profile = profile_model(model, IdTokenizer(), prompts, out,
                            ProfileOptions(batch_size=batch_size, max_tokens=None, progress=False, overwrite=True))
    return int(profile.counters["tokens"].sum())


def peak_rss_mb(args, count: int) -> float:
    """Peak RSS of a fresh process that profiles `count` prompts."""
    command = [sys.executable, __file__, "--memory-run", str(count), "--tokens", str(args.tokens),
               "--batch-size", str(args.batch_size), *(["--model", args.model] if args.model else [])]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256, help="longest prompt; lengths are uniform in [n/2, n]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared CPUs: 1 is steadier)")
    parser.add_argument("--memory-run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    vocab = model.config.get_text_config().vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory_run:
            profiled(model, make_prompts(args.memory_run, args.tokens, vocab), args.batch_size, Path(tmp) / "p")
            print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
            return
        prompts = make_prompts(args.prompts, args.tokens, vocab)
        plain(model, prompts[: args.batch_size], args.batch_size)  # warm-up
        best = {(name, clock): 0.0 for name in ("plain", "profile") for clock in ("wall", "cpu")}
        for _ in range(args.rounds):
            for name, fn in (("plain", lambda: plain(model, prompts, args.batch_size)),
                             ("profile", lambda: profiled(model, prompts, args.batch_size, Path(tmp) / "p"))):
                wall, cpu = time.perf_counter(), time.process_time()
                tokens = fn()
                for clock, elapsed in (("wall", time.perf_counter() - wall), ("cpu", time.process_time() - cpu)):
                    best[name, clock] = max(best[name, clock], tokens / elapsed)
    print(f"{args.prompts} prompts of <= {args.tokens} tokens, batch {args.batch_size}, {args.threads} thread(s), "
          f"best of {args.rounds} alternating rounds")
    for clock in ("wall", "cpu"):
        plain_rate, profile_rate = best["plain", clock], best["profile", clock]
        print(f"{clock:>4} clock: plain forward {plain_rate:,.0f} tok/s, profile {profile_rate:,.0f} tok/s, "
              f"throughput ratio profile/plain: {profile_rate / plain_rate:.3f}  (target >= 0.95)")
    small, large = peak_rss_mb(args, args.prompts), peak_rss_mb(args, 10 * args.prompts)
    print(f"peak RSS: {small:.0f} MB at {args.prompts} prompts, {large:.0f} MB at {10 * args.prompts} prompts")
    print(f"peak memory ratio 10x tokens / 1x: {large / small:.3f}  (target < 1.05)")


if __name__ == "__main__":
    main()
