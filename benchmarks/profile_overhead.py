"""What profiling costs: tokens/s of capture and `profile_model` (prefill; with co-activation; with
saliency; with generation) against plain forward passes over the same prompts in the same process,
and on the CPU the peak memory growth when the token count grows 10x. Prints the ratios.

    python benchmarks/profile_overhead.py                                  # CPU, demo-sized model
    python benchmarks/profile_overhead.py --shape tiny --prompts 16 --tokens 64 --rounds 1
    python benchmarks/profile_overhead.py --device cuda --shape qwen3-30b-a3b --dtype bfloat16 \\
        --prompts 64 --tokens 2048 --rounds 2 --quantize

Targets (issue 17): prefill >= 0.95 of plain tokens/s, co-activation >= 0.93, generation >= 0.90,
saliency >= 0.75; peak memory at 10x tokens < 1.05x. Shapes: `demo` (the default: hidden 128,
4 layers, 16 experts top-2, 8k vocabulary), `tiny` (tests), `qwen3-30b-a3b` (Qwen3-30B-A3B's
published shape, 30.5B parameters, random weights built on the device, nothing downloaded).
Prompts are random ids, lengths uniform in [tokens/2, tokens]; rounds alternate plain / measured so
that load from other jobs hits both alike, and the best round of each counts (by wall clock; on
the CPU also by this process's CPU time, steadier on shared machines). On a GPU every timed run
ends with a synchronisation, and the peak GPU memory is printed beside `moescope inspect`'s
estimate. Where the time goes: benchmarks/profile_breakdown.py.
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

from moescope.backends.hf.capture import capture_routing
from moescope.calibration import Prompt
from moescope.models.tiny import tiny_config
from moescope.profiling.run import ProfileOptions, profile_model

SHAPES = {  # qwen3_moe config overrides (a context long enough that no prompt is cut), and the attention kernel
    "tiny": (dict(max_position_embeddings=4096), "eager"),
    "demo": (dict(hidden_size=128, num_hidden_layers=4, num_experts=16, moe_intermediate_size=64,
                  intermediate_size=256, vocab_size=8192, num_attention_heads=4, head_dim=32,
                  max_position_embeddings=4096), "eager"),
    "qwen3-30b-a3b": (dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                           head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                           intermediate_size=6144, vocab_size=151936, max_position_embeddings=40960,
                           rope_theta=1e6, rms_norm_eps=1e-6), "sdpa"),
}


class IdTokenizer:
    """Tokenises "12 7 99" as [12, 7, 99]: the prompts are random ids already."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}


def build(args):
    """The model to measure: a checkpoint (--model) or a random one of --shape, on --device at --dtype."""
    dtype = getattr(torch, args.dtype)
    if args.model:
        from moescope.backends.hf.loading import Placement, load_model

        return load_model(args.model, Placement(args.device, args.dtype))
    from moescope.models.tiny import random_model  # here: profile_breakdown.py imports this module on old checkouts

    overrides, attention = SHAPES[args.shape]
    config = tiny_config("qwen3_moe", **{**overrides, **({"num_hidden_layers": args.layers} if args.layers else {})})
    config._attn_implementation = attention
    return random_model(config, device=args.device, dtype=dtype)


def make_prompts(count: int, tokens: int, vocab: int, seed: int = 0) -> list[Prompt]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(tokens // 2, tokens + 1, (count,), generator=generator)
    domains = ("prose", "math", "code", "chat")
    return [Prompt(f"p{i}", domains[i % 4], ("en", "de", "zh")[i % 3],
                   " ".join(map(str, torch.randint(0, vocab, (int(n),), generator=generator).tolist())))
            for i, n in enumerate(lengths)]


def left_padded(prompts: list[Prompt], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows = [IdTokenizer()(p.text)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids.to(device), mask.to(device), sum(map(len, rows))


@torch.inference_mode()
def plain(model, prompts: list[Prompt], batch_size: int, generate: int = 0) -> int:
    """The batches the profiler runs (prefill, then greedy decoding with the cache), without hooks;
    returns the tokens routed."""
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        ids, mask, count = left_padded(prompts[start:start + batch_size], model.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        output = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=generate > 0,
                       logits_to_keep=1)
        for _ in range(generate):
            token = output.logits[:, -1].argmax(-1)
            mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
            position = position[:, -1:] + 1
            output = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                           cache=output.cache, use_cache=True, logits_to_keep=1)
        tokens += count + generate * len(ids)
    return tokens


def hooks_only(model, prompts: list[Prompt], batch_size: int) -> int:
    """Plain prefill with the capture hooks on and every event dropped: what capture alone costs."""
    with capture_routing(model, on_event=lambda event: None):
        return plain(model, prompts, batch_size)


def profiled(model, prompts: list[Prompt], batch_size: int, out: Path, **options) -> int:
    profile = profile_model(model, IdTokenizer(), prompts, out,
                            ProfileOptions(batch_size=batch_size, max_tokens=None, progress=False, overwrite=True,
                                           **options))
    return int(profile.counters["tokens"].sum())


def finished(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_rates(model, device, rounds: int, runs: dict) -> dict:
    """Best tokens/s of each run over `rounds` alternating rounds: {(name, clock): rate}."""
    best = {(name, clock): 0.0 for name in runs for clock in ("wall", "cpu")}
    for _ in range(rounds):
        for name, run in runs.items():
            finished(device)
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = run()
            finished(device)
            for clock, elapsed in (("wall", time.perf_counter() - wall), ("cpu", time.process_time() - cpu)):
                best[name, clock] = max(best[name, clock], tokens / elapsed)
    return best


def peak_rss_mb(args, count: int) -> float:
    """Peak RSS of a fresh process that profiles `count` prompts."""
    command = [sys.executable, __file__, "--memory-run", str(count), "--tokens", str(args.tokens), "--batch-size",
               str(args.batch_size), "--shape", args.shape, *(["--model", args.model] if args.model else [])]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["peak_mb"]


def estimated_footprint(model, args) -> int:
    """`moescope inspect`'s estimate for this profile run (the arithmetic of moescope.models.footprint)."""
    from moescope.models.footprint import footprint
    from moescope.models.registry import find_moe_layers

    layers = find_moe_layers(model)
    experts = {layer.index: layer.num_experts for layer in layers}
    in_experts = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    info = {"params_total": sum(p.numel() for p in model.parameters()), "num_layers": model.config.num_hidden_layers,
            "bytes_total": sum(p.numel() * p.element_size() for p in model.parameters()), "top_k": layers[0].top_k,
            "moe_layers": list(experts), "experts_per_layer": experts, "params_in_experts": in_experts}
    return footprint(info, model.config.to_dict(), "profile", args.dtype, args.batch_size, args.tokens,
                     saliency=True).total


def quantize_times(model) -> str:
    """Seconds to fake-quantise every expert weight in place: 4-bit minmax, then 3-bit MSE-searched."""
    from moescope.compress.quant.apply import apply_bit_plan, uniform_plan
    from moescope.plans import QuantOptions

    times = []
    for bits, scales in ((4, "minmax"), (3, "mse")):
        plan = uniform_plan(model, bits, QuantOptions(scales=scales))
        finished(model.device)
        start = time.perf_counter()
        apply_bit_plan(model, plan)
        finished(model.device)
        times.append(f"{bits}-bit {scales} {time.perf_counter() - start:.1f} s")
    return ", ".join(times)


def report(best: dict, name: str, base: str, target: str, clocks: tuple[str, ...]) -> None:
    ratios = "  ".join(f"{clock} {best[name, clock] / best[base, clock]:.3f}" for clock in clocks)
    print(f"{name:<28} {best[name, 'wall']:>12,.0f} tok/s   ratio to {base}: {ratios}   (target {target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint instead of a random --shape")
    parser.add_argument("--shape", choices=SHAPES, default="demo")
    parser.add_argument("--layers", type=int, help="keep this many layers of the shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256, help="longest prompt; lengths are uniform in [n/2, n]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--generate", type=int, default=32, help="tokens generated per prompt in the decode runs")
    parser.add_argument("--generate-prompts", type=int, default=16, help="prompts of the decode runs")
    parser.add_argument("--generate-tokens", type=int, default=256, help="their longest prompt")
    parser.add_argument("--quantize", action="store_true", help="also time fake-quantising every expert weight")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared CPUs: 1 is steadier)")
    parser.add_argument("--memory-run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build(args)
    vocab = model.config.get_text_config().vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p"
        if args.memory_run:
            profiled(model, make_prompts(args.memory_run, args.tokens, vocab), args.batch_size, out)
            print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
            return
        measure(model, args, vocab, out, started)
    if args.quantize:
        experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        print(f"fake-quantising all {experts:,} expert weights: {quantize_times(model)}")


def measure(model, args, vocab: int, out: Path, started: float) -> None:
    """The ratios of the issue's table, printed."""
    cuda = torch.device(args.device).type == "cuda"
    clocks = ("wall",) if cuda else ("wall", "cpu")
    prompts = make_prompts(args.prompts, args.tokens, vocab)
    short = make_prompts(args.generate_prompts, args.generate_tokens, vocab, seed=1)
    config, size = model.config, sum(p.numel() for p in model.parameters())
    print(f"{args.model or args.shape}: {size / 1e9:.2f}B ({size:,}) parameters, {config.num_hidden_layers} layers, "
          f"{config.num_experts} experts top-{config.num_experts_per_tok}, {args.dtype} on {args.device} "
          f"(built in {time.perf_counter() - started:.0f} s); {args.prompts} prompts "
          f"of {args.tokens // 2}-{args.tokens} tokens, batch {args.batch_size}, best of {args.rounds} rounds")
    plain(model, prompts[: args.batch_size], args.batch_size, generate=2)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    best = best_rates(model, args.device, args.rounds, {
        "plain forward": lambda: plain(model, prompts, args.batch_size),
        "capture hooks alone": lambda: hooks_only(model, prompts, args.batch_size),
        "profile prefill": lambda: profiled(model, prompts, args.batch_size, out),
        "with coactivation": lambda: profiled(model, prompts, args.batch_size, out, coactivation=True),
        "with saliency": lambda: profiled(model, prompts, args.batch_size, out, saliency=True),
    })
    for name, target in (("capture hooks alone", "-"), ("profile prefill", ">= 0.95"),
                         ("with coactivation", ">= 0.93"), ("with saliency", ">= 0.75")):
        report(best, name, "plain forward", target, clocks)
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; `moescope inspect --for profile "
              f"--saliency` estimates {estimated_footprint(model, args) / 2**30:.1f} GiB")
    best = best_rates(model, args.device, args.rounds, {
        "plain decode": lambda: plain(model, short, args.batch_size, args.generate),
        "with generation": lambda: profiled(model, short, args.batch_size, out, generate=args.generate),
    })
    print(f"decode runs: {args.generate_prompts} prompts of {args.generate_tokens // 2}-{args.generate_tokens} tokens, "
          f"{args.generate} generated each")
    report(best, "with generation", "plain decode", ">= 0.90", clocks)
    if not cuda and not args.model:
        small, large = peak_rss_mb(args, args.prompts), peak_rss_mb(args, 10 * args.prompts)
        print(f"peak RSS: {small:.0f} MB at {args.prompts} prompts, {large:.0f} MB at {10 * args.prompts} prompts; "
              f"ratio {large / small:.3f}  (target < 1.05)")


if __name__ == "__main__":
    main()
