"""Round trip of moescope's exports through the real runtimes (`make check-exports` runs it per runtime).

    python scripts/roundtrip/check.py RUNTIME [--work DIR] [--cases demo,random] [--llama-cpp-python SDIST]

RUNTIME: compressed-tensors (llm-compressor writes, transformers loads), compressed-tensors-vllm (llm-compressor
writes; vLLM's scheme rules and per-module decoding, since vLLM itself needs a GPU), mlx (mlx-lm converts and
loads), llama-cpp (llama.cpp converts, quantises and runs). Run it with the Python of an environment holding
moescope and the runtime (the extras roundtrip-compressed-tensors, roundtrip-mlx, roundtrip-llama-cpp).

For each case (the demo model, and a random Qwen3-MoE with rows of 256, each with a plan mixed per layer):
1. `moescope export PLAN ... --model MODEL --coarsened-plan coarse.json`, as a user would;
2. `moescope quantize MODEL --plan coarse.json`: the fake-quantised reference;
3. the runtime builds its artefact from the export and loads it;
4. the weights it serves are compared with the reference (bit for bit where it rounds as moescope does, by
   error where it does not) and its logits on held-out windows with the reference's; perplexities printed;
5. the same comparison against the reference of a sabotaged plan (one layer at another width) must fail, and
   only on that layer: proof that the check can fail.
Exit status 0 only if every case passes and every sabotage is caught; failures are printed in full.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402  (this folder, put on the path above)
    Case,
    demo_case,
    export_and_reference,
    heldout_windows,
    logits_of,
    parameters,
    random_case,
    reference,
    sabotaged,
    transformers_model,
)

from moescope.judge.roundtrip import RoundTrip, RoundTripFailed, compare_logits, logits_perplexity  # noqa: E402
from moescope.plans import load_bit_plan  # noqa: E402

RUNTIMES = {"compressed-tensors": "rt_compressed_tensors", "compressed-tensors-vllm": "rt_compressed_tensors_vllm",
            "mlx": "rt_mlx", "llama-cpp": "rt_llama_cpp"}


def check_case(runtime, case: Case, work: Path, options: argparse.Namespace) -> list[str]:
    """One case: the round trip, then the sabotage; returns the failures (empty when all is well)."""
    export_file, coarse, ref_dir = export_and_reference(case, work, runtime.EXPORT_ARGS, runtime.EXPORT_FILE)
    windows, texts = heldout_windows(case.model_dir)
    ref_model = transformers_model(ref_dir)
    ref_weights, ref_logits = parameters(ref_model), logits_of(ref_model, windows)
    started = time.time()
    served = runtime.serve(case, work, export_file, coarse, windows, texts, options)
    print(f"[{runtime.NAME} {case.name}] built and loaded in {time.time() - started:.0f} s")
    trip = RoundTrip(f"{runtime.NAME}, {case.name} model")
    for arguments in served.compare:
        trip.compare_weights(served.weights, ref_weights, **arguments)
    trip.problems += served.problems + served.structure(coarse)
    lines = [*served.lines]
    if served.logits is not None:
        lines.append(trip.check_logits(f"{runtime.NAME} vs the fake-quantised model", compare_logits(
            served.logits, ref_logits), **runtime.LOGIT_BOUND))
        original = logits_perplexity(logits_of(transformers_model(case.model_dir), windows), windows)
        lines.append(f"perplexity on {len(windows)} held-out windows of {windows.shape[1]} tokens: {runtime.NAME} "
                     f"{logits_perplexity(served.logits, windows):.4f}, fake-quantised "
                     f"{logits_perplexity(ref_logits, windows):.4f}, original {original:.4f}")
    for what, candidate, baseline, bound in served.logit_checks:
        lines.append(trip.check_logits(what, compare_logits(candidate, baseline), **bound))
    failures = []
    try:
        lines.append(trip.verdict())
    except RoundTripFailed as failed:
        failures.append(str(failed))
    print("\n".join(f"[{runtime.NAME} {case.name}] {line}" for line in lines), flush=True)
    failures += sabotage(runtime, case, work, coarse, served)
    return failures


def sabotage(runtime, case: Case, work: Path, coarse, served) -> list[str]:
    """The runtime's weights against a plan with one layer changed: the check must fail, on that layer only."""
    layer = case.sabotage_layer
    wrong_dir = reference(case, sabotaged(coarse, layer, work), work / "sabotaged-reference")
    wrong_plan = load_bit_plan(work / "sabotaged.json")
    trip = RoundTrip(f"{runtime.NAME}, {case.name} model, against a plan with layer {layer} at "
                     f"{wrong_plan.layers[layer][0]} bits")
    for arguments in served.compare:
        trip.compare_weights(served.weights, parameters(transformers_model(wrong_dir)), **arguments)
    trip.problems += served.structure(wrong_plan)
    caught = trip.failures()
    elsewhere = [f for f in caught if f"layers.{layer}." not in f and f"blk.{layer}." not in f]
    if caught and not elsewhere:
        print(f"[{runtime.NAME} {case.name}] sabotage caught: a plan with layer {layer} at "
              f"{wrong_plan.layers[layer][0]} bits fails the check on {len(caught)} items, all of layer {layer}:")
        print("\n".join(f"    {line}" for line in caught[:6]), flush=True)
        return []
    return [f"SABOTAGE NOT CAUGHT ({trip.what}): " + ("no failure at all" if not caught else
                                                      f"failures outside layer {layer}: {elsewhere[:4]}")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runtime", choices=list(RUNTIMES))
    parser.add_argument("--work", type=Path, default=Path(".roundtrip/work"), help="scratch folder (reused)")
    parser.add_argument("--cases", default="demo,random", help="comma-separated: demo, random")
    parser.add_argument("--llama-cpp-python", type=Path, help="llama-cpp-python's unpacked sdist, llama.cpp built in "
                        "vendor/llama.cpp/build (llama-cpp only)")
    options = parser.parse_args()
    runtime = importlib.import_module(RUNTIMES[options.runtime])
    print(runtime.versions(options), flush=True)
    failures = []
    for name in options.cases.split(","):
        work = options.work / options.runtime / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        case = demo_case() if name == "demo" else random_case(options.work)
        failures += check_case(runtime, case, work, options)
    if failures:
        print("\n".join(["", f"check-exports {options.runtime}: FAILED", *failures]), file=sys.stderr)
        return 1
    print(f"check-exports {options.runtime}: every case round-trips and every sabotage was caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
