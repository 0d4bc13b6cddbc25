"""Per-expert bit widths under MLX: generation speed against uniform 4-bit, size on disk, and the
perplexity that only per-expert widths deliver at a given size.

The model (`--model`, the demo model by default; or with `--wide` a random Qwen3-MoE with wider
experts, 768 x 384, whose matrix work outweighs per-call overheads as in real models) is first written
in bfloat16, the dtype models are served in, so that sizes compare with bfloat16 as they are. Then:

1. Speed. The model is written really quantised three ways at 4.00 average bits per expert weight:
   uniform 4-bit (mlx-lm's own layout), a per-expert plan allocated under a 4.0-bit budget, and the
   worst case for the packed layer, every layer holding all four widths (experts cycling through
   2, 3, 3, 8, 4, 4, 4, 4 bits). Each is loaded with `moescope.load` and generates `--tokens` greedy
   tokens after a 32-token prompt (mlx-lm's `generate_step`; the prefill is not timed), and runs a
   prefill of 4 x 128 tokens, computing in `--speed-dtype` (float32 by default: on a CPU mlx multiplies
   bfloat16 without BLAS, which slows the unquantised layers and flatters the ratios). Every round
   runs each model once, in a new random order (the CPU is shared and its speed drifts, so only
   ratios measured in the same run mean anything); the median tokens/s of each over `--rounds` rounds,
   by wall clock and by the process's CPU time, is set against uniform 4-bit's.
2. Size. Bytes of tensors on disk of each written model over the model's size in bfloat16.
3. Quality (unless --skip-quality). Plans allocated under a `--budget` of average bits with Fisher
   importance on the calibration set: per expert (served by the packed layer), per layer at the same
   budget (`--per-layer`, what mlx-lm serves as it is), and the per-expert plan coarsened to the
   nearest width per layer. Each is written with `quantize --backend mlx` and its perplexity measured
   under MLX in float32 on the held-out sets (`--sequences` windows of 256 tokens per domain and
   language, geometric mean), against the bfloat16 model itself under MLX.

Every plan uses MLX's own grid (group size 64, asymmetric, `--scales mlx`), so what is allocated is
what is served.

    python benchmarks/packed_experts.py [--model moescope/assets/demo-moe | --wide] [--work DIR]
        [--rounds 9] [--tokens 32] [--speed-dtype float32] [--budget 3.0] [--sequences 8]
        [--calibration-tokens 4096] [--skip-quality]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from moescope.backends.hf.loading import Placement, load_model, load_tokenizer, model_on_meta
from moescope.calibration import CALIBRATION, DEMO_MODEL, HELDOUT, load_calibration
from moescope.cli import main as moescope
from moescope.compress.checkpoint import save_model_checkpoint
from moescope.compress.mlx_quantize import disk_size
from moescope.compress.quant.allocation import budget_plan
from moescope.compress.quant.apply import uniform_plan
from moescope.compress.quant.distortion import allocation_inputs
from moescope.compress.quant.memory import memory_estimate
from moescope.judge.evaluate import Protocol, evaluate
from moescope.models.tiny import tiny_model
from moescope.plans import SUPPORTED_BITS, BitPlan, QuantOptions, save_bit_plan

OPTIONS = QuantOptions(group_size=64, symmetric=False, scales="mlx")  # what MLX stores
WORST_CASE = (2, 3, 3, 8, 4, 4, 4, 4)  # all four widths in every layer, 4.00 bits on average
UNIFORM = "uniform 4-bit (mlx-lm layout)"
# A random Qwen3-MoE whose experts are wide enough for their matrix work to dominate, with the demo's tokenizer.
WIDE = dict(hidden_size=768, moe_intermediate_size=384, intermediate_size=1536, num_experts=16, num_experts_per_tok=4,
            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=96, vocab_size=8192)


def bfloat16_source(args, work: Path) -> Path:
    """The model to quantise, in bfloat16: the --model checkpoint converted, or the random --wide model."""
    out = work / ("wide-bf16" if args.wide else "source-bf16")
    if out.exists():
        return out
    if args.wide:
        model = tiny_model("qwen3_moe", **WIDE).bfloat16()
        model.save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEMO_MODEL / name, out / name)
    else:
        save_model_checkpoint(load_model(args.model, dtype="bfloat16"), args.model, out)
    return out


def quantize(model: Path, plan: BitPlan, out: Path, *flags: str) -> Path:
    """`moescope quantize MODEL --plan PLAN --backend mlx FLAGS --out OUT` (the plan saved beside OUT)."""
    if not out.exists():
        plan_file = out.parent / f"{out.name}.plan.json"
        save_bit_plan(plan, plan_file)
        command = ["quantize", str(model), "--plan", str(plan_file), "--backend", "mlx", *flags,
                   "--out", str(out)]
        print("$ moescope " + " ".join(command), flush=True)
        if moescope(command) != 0:
            raise SystemExit(f"moescope {' '.join(command)} failed")
    return out


def fisher_plans(model_dir: Path, budgets: list[tuple[float, bool]], tokens: int) -> dict:
    """Plans allocated with Fisher importance on the calibration set, one per (average bits, per layer)."""
    model = load_model(model_dir, dtype="float32")
    importance, distortion, source = allocation_inputs(model, "fisher", None, SUPPORTED_BITS, OPTIONS,
                                                       str(CALIBRATION), load_tokenizer(model_dir), tokens)
    return {(bits, per_layer): budget_plan(model, importance, distortion, SUPPORTED_BITS, avg_bits=bits,
                                           options=OPTIONS, per_layer=per_layer, source=dict(source))
            for bits, per_layer in budgets}


def calibration_ids(model_dir: Path, count: int = 160) -> list[int]:
    """The first `count` tokens of the calibration texts (prompts for the speed runs)."""
    text = " ".join(p.text for p in load_calibration(CALIBRATION)[:8] if p.text)
    ids = load_tokenizer(model_dir)(text)["input_ids"]
    if len(ids) < count:
        raise SystemExit(f"the calibration texts give {len(ids)} tokens, fewer than {count}")
    return ids[:count]


def speeds(models: dict[str, Path], ids: list[int], tokens: int, rounds: int,
           dtype: str) -> dict[str, dict[str, list]]:
    """Per model and round: (tokens/s by wall clock, by CPU time) of greedy generation after the first 32 of
    `ids` ("decode") and of a prefill of 4 x 128 of them ("prefill"), every round running the models in a
    new random order."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    import moescope as api

    loaded = {name: api.load(path)[0] for name, path in models.items()}
    for module in loaded.values():  # scales, offsets and unquantised weights; the packed codes stay as they are
        module.set_dtype(getattr(mx, dtype))
    prompt, batch = ids[:32], mx.array([ids[i * 8:i * 8 + 128] for i in range(4)])

    def timed(work) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        made = work()
        return made / (time.perf_counter() - wall), made / (time.process_time() - cpu)

    def decode(module, count: int) -> tuple[float, float]:
        steps = generate_step(mx.array(prompt), module, max_tokens=count)
        next(steps)  # the prefill and the first token are not timed
        return timed(lambda: sum(1 for _ in steps))

    def prefill(module) -> tuple[float, float]:
        return timed(lambda: mx.eval(module(batch)) or batch.size)

    for module in loaded.values():
        decode(module, 4)  # warm-up
    measured: dict[str, dict[str, list]] = {name: {"decode": [], "prefill": []} for name in loaded}
    order = list(loaded)
    for _ in tqdm(range(rounds), desc="speed rounds"):
        random.shuffle(order)
        for name in order:
            measured[name]["decode"].append(decode(loaded[name], tokens))
            measured[name]["prefill"].append(prefill(loaded[name]))
    return measured


def size_line(name: str, directory: Path, bf16_bytes: int, experts_per_layer: dict[int, int]) -> str:
    disk = disk_size(directory, experts_per_layer)
    return (f"{name:<36} {disk.total_bytes / 1e6:7.2f} MB on disk = {disk.total_bytes / bf16_bytes:.3f} of bf16, "
            f"routed experts {disk.expert_bytes / 1e6:.2f} MB")


def speed_and_size(args, source: Path, work: Path, meta, plans: dict) -> None:
    layers = {i: len(bits) for i, bits in uniform_plan(meta, 4).layers.items()}
    worst = uniform_plan(meta, 4, OPTIONS)
    worst.layers = {i: [WORST_CASE[e % len(WORST_CASE)] for e in range(n)] for i, n in layers.items()}
    worst.method = "budget"
    models = {UNIFORM: quantize(source, uniform_plan(meta, 4, OPTIONS), work / "uniform4"),
              "per expert, allocated (4.00 bits)": quantize(source, plans[(4.0, False)], work / "expert4",
                                                            "--per-expert"),
              "per expert, 4 widths a layer (4.00)": quantize(source, worst, work / "worst4", "--per-expert")}
    measured = speeds(models, calibration_ids(source), args.tokens, args.rounds, args.speed_dtype)
    for kind, what in (("decode", f"generation of {args.tokens} tokens after a 32-token prompt"),
                       ("prefill", "prefill of 4 x 128 tokens")):
        print(f"\n{what}, computed in {args.speed_dtype}, medians of {args.rounds} rounds in random order; tokens/s "
              "by wall clock (by CPU time), and over uniform 4-bit's:")
        base = [statistics.median(v[i] for v in measured[UNIFORM][kind]) for i in (0, 1)]
        for name, runs in measured.items():
            wall, cpu = (statistics.median(v[i] for v in runs[kind]) for i in (0, 1))
            rounds = ", ".join(f"{v[0] / u[0]:.2f}" for u, v in zip(measured[UNIFORM][kind], runs[kind]))
            print(f"{name:<36} {wall:8.1f} ({cpu:8.1f}) tokens/s = {wall / base[0]:.3f} ({cpu / base[1]:.3f}); "
                  f"rounds {rounds}")
    bf16 = memory_estimate(meta, uniform_plan(meta, 4)).bf16_bytes
    print(f"\nsize (the model in bf16: {bf16 / 1e6:.2f} MB):")
    for name, directory in models.items():
        print(size_line(name, directory, bf16, layers))


def quality(args, source: Path, work: Path, meta, plans: dict) -> None:
    bits = args.budget
    layers = {i: len(b) for i, b in uniform_plan(meta, 4).layers.items()}
    models = {"the bf16 model (under MLX)": source,
              f"per expert ({bits} bits)": quantize(source, plans[(bits, False)], work / f"expert{bits}",
                                                    "--per-expert"),
              f"per layer, allocated ({bits})": quantize(source, plans[(bits, True)], work / f"layer{bits}"),
              "per expert coarsened, nearest": quantize(source, plans[(bits, False)], work / f"nearest{bits}",
                                                        "--coarsen", "nearest")}
    protocol = Protocol(seq_len=256, sequences=args.sequences, placement=Placement(dtype="float32"), backend="mlx")
    bf16 = memory_estimate(meta, uniform_plan(meta, 4)).bf16_bytes
    print(f"\nperplexity under MLX (float32), {args.sequences} windows of 256 tokens per held-out domain and "
          "language, geometric mean:")
    original = None
    for name, directory in models.items():
        started = time.perf_counter()
        result = evaluate(str(directory), protocol, str(HELDOUT))["perplexity_geomean"]
        original = original or result
        size = size_line("", directory, bf16, layers).strip() if directory != source else ""
        print(f"{name:<36} {result:8.4f} ({result / original - 1:+.2%})  {size}  "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--wide", action="store_true", help="a random Qwen3-MoE with wider experts instead of --model")
    parser.add_argument("--work", type=Path, help="where the quantised models go (default: a temporary directory)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--speed-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="what the speed runs compute in (default float32: on a CPU mlx multiplies bfloat16 "
                        "without BLAS, which slows the unquantised layers and flatters the ratios)")
    parser.add_argument("--budget", type=float, default=3.0, help="average bits of the quality comparison")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        source = bfloat16_source(args, work)
        meta = model_on_meta(source)
        budgets = [(4.0, False)] + ([] if args.skip_quality else [(args.budget, False), (args.budget, True)])
        plans = fisher_plans(source, budgets, args.calibration_tokens)
        speed_and_size(args, source, work, meta, plans)
        if not args.skip_quality:
            quality(args, source, work, meta, plans)


if __name__ == "__main__":
    main()
