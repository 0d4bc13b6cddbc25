"""`moescope demo`: the whole pipeline on the embedded model, ending in one HTML page of findings.

Stages, each in its own directory under --out and skipped when already complete (so an interrupted
run resumes where it stopped):

  profile   the full calibration set and the English-only one, with generation
  report    routing statistics with error bars and the HTML report of the full profile
  prune     sweep of criteria x ratios (remove), English-only calibration, replay of -1e9 / mask / remove
            (remove: routers compared with the masked original's); per-window NLLs for intervals
  merge     removal (by a criterion chosen in advance) vs merging, each with and without router repair,
            at equal expert counts
  quantize  uniform vs tiered vs budget-allocated bits (allocated as `quantize --budget` does)
  gate      the regression gate on the recommended model and on a deliberately bad one
  mlx       (with the moescope[mlx] extra) the model profiled under mlx-lm, its tiered plan written as a
            really quantised mlx-lm model and evaluated against the original
  index     findings.json, then index.html and findings.md from it: each claim judged by the rule stated
            for it in moescope.report.findings

Every figure on the final page comes from this run; `--quick` shrinks every stage for tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from moescope.analysis.analyse import analyse
from moescope.analysis.selection import make_prune_plan
from moescope.analysis.tiers import TierOptions, tier_bit_plan
from moescope.backends.hf.loading import Placement, load_model, load_tokenizer
from moescope.backends.mlx.loading import mlx_installed
from moescope.calibration import ASSETS, CALIBRATION, DEMO_MODEL, HELDOUT, PROBES
from moescope.compress import prune as pruning
from moescope.compress.checkpoint import save_model_checkpoint
from moescope.compress.quant.allocation import budget_plan
from moescope.compress.quant.apply import apply_bit_plan, uniform_plan
from moescope.compress.quant.distortion import allocation_inputs
from moescope.errors import MoescopeError
from moescope.judge.accuracy import expert_accuracy, load_items
from moescope.judge.evaluate import group_perplexities, load_windows
from moescope.judge.gate import GateOptions, gate
from moescope.judge.nll import geometric_mean
from moescope.judge.sweep import sweep_prune, write_csv
from moescope.output import write_atomic
from moescope.plans import SUPPORTED_BITS, QuantOptions, bit_plan_text, save_bit_plan
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import Profile
from moescope.report.charts import plot_sweep
from moescope.report.demo_compare import merge_stage, mlx_stage
from moescope.report.demo_settings import DemoSettings, by_criterion, curve_at, load_prompts, protocol, window_means
from moescope.report.findings import findings
from moescope.report.findings_page import findings_markdown, index_html
from moescope.report.gate_page import render_html
from moescope.report.page import write_report


def run_stage(out: Path, name: str, build: Callable[[Path], dict], log=print) -> dict:
    """Run `build(work_dir)` unless `out/name` is complete; results land under the final name atomically."""
    final = out / name
    if (final / "stage.json").is_file():
        log(f"[{name}] already complete, skipped")
        return json.loads((final / "stage.json").read_text())
    work = out / f".{name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    log(f"[{name}] running")
    result = build(work)
    result["seconds"] = round(time.perf_counter() - start, 1)
    (work / "stage.json").write_text(json.dumps(result, indent=2) + "\n")
    os.replace(work, final)
    log(f"[{name}] done in {result['seconds']} s")
    return result


def profile_stage(settings: DemoSettings, model_dir: Path) -> Callable[[Path], dict]:
    def build(work: Path) -> dict:

        model, tokenizer = load_model(model_dir, settings.placement), load_tokenizer(model_dir)
        result = {}
        for name, file in (("full", "calibration.jsonl"), ("english", "calibration-english.jsonl")):
            prompts = load_prompts(ASSETS / file, settings.prompts)
            options = ProfileOptions(generate=settings.generate, saliency=True, coactivation=name == "full")
            profile = profile_model(model, tokenizer, prompts, work / name, options)
            result[name] = {"prompts": len(prompts), "tokens": int(profile.counters["tokens"].sum())}
        return result

    return build


def report_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    def build(work: Path) -> dict:

        items = load_items(ASSETS / "items.jsonl")[: settings.items]
        accuracy = expert_accuracy(load_model(model_dir, settings.placement), load_tokenizer(model_dir), items)
        (work / "accuracy.json").write_text(json.dumps(accuracy, indent=1) + "\n")
        profile = Profile.load(out / "profile" / "full")
        analysis = analyse(profile)
        write_report(profile, analysis, work / "report.html", accuracy)
        (work / "stats.json").write_text(json.dumps(analysis.to_json(), indent=1) + "\n")
        summary = analysis.summary
        balance = {key: {"mean": summary["mean"][key], "lo": summary["mean_ci"][key][0],
                         "hi": summary["mean_ci"][key][1]} for key in ("entropy_ratio", "gini", "top_ratio")}
        return {"dead": summary["dead"], "experts": summary["experts"], "prompts": summary["prompts"],
                "unseen": summary["unseen"], "prompts_needed": summary["prompts_needed"],
                "dead_at": {**{str(n): curve_at(analysis.curve, n) for n in (1, 5, 20)},
                            "all": curve_at(analysis.curve, summary["prompts"])},
                "unseen_check": summary["validation"], "balance": balance, "items": accuracy["items"],
                "item_accuracy": accuracy["accuracy"]}

    return build


def prune_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    def build(work: Path) -> dict:
        heldout = str(HELDOUT)
        full, english = out / "profile" / "full", out / "profile" / "english"
        per_window, english_windows = {}, {}
        rows = sweep_prune(str(model_dir), str(full), list(settings.ratios), list(settings.criteria), "remove",
                           heldout, protocol(settings), per_window=per_window)
        write_csv(rows, work / "sweep.csv")
        (work / "sweep.svg").write_text(plot_sweep(rows))
        biased = sweep_prune(str(model_dir), str(english), [settings.bad_ratio], ["frequency"], "remove", heldout,
                             protocol(settings), per_window=english_windows)
        write_csv(biased, work / "sweep-english.csv")
        windows = window_means(by_criterion(per_window))
        windows[f"english-frequency@{settings.bad_ratio:g}"] = window_means(by_criterion(english_windows))[
            f"frequency@{settings.bad_ratio:g}"]
        balanced = {(r["domain"], r["lang"]): r["vs_baseline"] for r in rows
                    if r["criterion"] == "frequency" and r["ratio"] == settings.bad_ratio}
        bias = {f"{r['domain']}/{r['lang']}": r["vs_baseline"] / balanced[(r["domain"], r["lang"])]
                for r in biased if r["criterion"] == "frequency"}
        worst_group = max(bias, key=bias.get)
        plan = make_prune_plan(Profile.load(full), "frequency", ratio=settings.bad_ratio, profile_path=str(full))
        plan.save(work / "plan-frequency.json")
        bad_plan = make_prune_plan(Profile.load(english), "frequency", ratio=settings.bad_ratio,
                                   profile_path=str(english))
        pruning.prune_checkpoint(model_dir, work / "bad-model", bad_plan, "remove")
        middle = sorted(settings.ratios)[len(settings.ratios) // 2]
        return {"criteria": list(settings.criteria), "ratio_compared": middle, "smallest_ratio": min(settings.ratios),
                "bad_ratio": settings.bad_ratio, "windows": windows,
                "english_bias": bias, "english_worst_group": worst_group, "english_worst_ratio": bias[worst_group],
                "replay": replays(model_dir, plan, work, settings.placement)}

    return build


def replays(model_dir: Path, plan, work: Path, placement: Placement) -> dict:
    """The plan replayed through the -1e9 checkpoint, the run-time -inf mask and the removed checkpoint (whose
    routers are compared with the masked original's, `check_pruned`)."""
    batches = pruning.replay_batches(model_dir, str(CALIBRATION), 32, 128)
    model = load_model(model_dir, placement)
    with pruning.routing_offsets(model, pruning.offsets_for(plan)):
        masked = pruning.replay(model, batches, plan.prune)
    row_model = load_model(pruning.prune_checkpoint(model_dir, work / "row-1e9", plan, "row-1e9"), placement)
    row = pruning.replay(row_model, batches, plan.prune)
    shutil.rmtree(work / "row-1e9")
    removed_dir = pruning.prune_checkpoint(model_dir, work / "removed", plan, "remove")
    removal = pruning.check_pruned(model, load_model(removed_dir, placement), batches, plan, "remove")
    shutil.rmtree(removed_dir)

    def counts(result) -> dict:
        return {"pruned": result.pruned_total, "selections": sum(result.selections.values()),
                "share": result.pruned_share}

    return {"mask": counts(masked), "row_1e9": counts(row),
            "remove": {"max_share": max(removal.remove_vs_mask.values()), "exact": removal.exact,
                       "tolerance": pruning.REMOVE_TOLERANCE,
                       "by_layer": {str(layer): share for layer, share in removal.remove_vs_mask.items()}}}


def quantize_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    def build(work: Path) -> dict:
        full = out / "profile" / "full"
        model = load_model(model_dir, settings.placement)
        windows = load_windows(HELDOUT, load_tokenizer(model_dir), protocol(settings), model)
        per_window = {("none", None): {}}
        base = geometric_mean(group_perplexities(model, windows, per_window=per_window[("none", None)]).values())
        tiered, _ = tier_bit_plan(Profile.load(full), TierOptions(), str(full))
        average = float(np.mean([b for bits in tiered.layers.values() for b in bits]))
        # the allocation `moescope quantize --budget N --profile P` makes by default
        importance, distortion, source = allocation_inputs(model, "gate-energy", full, SUPPORTED_BITS, QuantOptions())
        plans = {"uniform-4": uniform_plan(model, 4), "uniform-3": uniform_plan(model, 3), "tiered": tiered,
                 "budget-at-tiered-bits": budget_plan(model, importance, distortion, avg_bits=average),
                 "budget-3": budget_plan(model, importance, distortion, avg_bits=3.0)}
        results = {}
        for name, plan in plans.items():
            save_bit_plan(plan, work / f"{name}.json")
            quantised = apply_bit_plan(load_model(model_dir, settings.placement), plan)
            ppl = geometric_mean(group_perplexities(quantised, windows, per_window=per_window.setdefault(
                (name, None), {})).values())
            bits = [b for layer in plan.layers.values() for b in layer]
            results[name] = {"average_bits": float(np.mean(bits)), "perplexity": ppl, "loss": ppl / base - 1,
                             "widths": sorted(set(bits)), "bits_hash": hashlib.sha256(
                                 json.dumps(plan.layers, sort_keys=True).encode()).hexdigest()[:16]}
            if name == "tiered":
                save_model_checkpoint(quantised, model_dir, work / "recommended-model",
                                      {"bit_plan.json": bit_plan_text(plan)})
        return {"baseline_perplexity": base, "plans": results, "recommended": "tiered",
                "windows": window_means(per_window),
                "allocation": f"importance {source['importance']} from the full profile x {source['distortion']}"}

    return build


def gate_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    def build(work: Path) -> dict:

        probes = PROBES
        if settings.probes:
            lines = [line for line in probes.read_text(encoding="utf-8").splitlines() if line.strip()]
            probes = work / "probes.jsonl"
            probes.write_text("\n".join(lines[:: max(1, len(lines) // settings.probes)][: settings.probes]) + "\n")
        options = GateOptions(max_new_tokens=settings.max_new_tokens, placement=settings.placement)
        result = {}
        for name, candidate in (("recommended", out / "quantize" / "recommended-model"),
                                ("bad", out / "prune" / "bad-model")):
            report = gate(model_dir, candidate, probes, options, log=lambda message: None)
            (work / f"gate-{name}.html").write_text(render_html(report), encoding="utf-8")
            (work / f"gate-{name}.json").write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
            result[name] = {"verdict": report["verdict"], "prompts_by_verdict": report["prompts_by_verdict"],
                            "checks": report["checks"]}
        return result

    return build


def run_demo(out: str | Path, settings: DemoSettings, model_dir: Path = DEMO_MODEL, log=print) -> Path:
    """Run every stage (skipping complete ones) and write out/index.html; returns its path."""
    out = Path(out)
    if not (model_dir / "model.safetensors").is_file():
        raise MoescopeError(f"the demo model is missing from {model_dir}: reinstall moescope")
    out.mkdir(parents=True, exist_ok=True)
    # Same commit, same thread count: the same figures (float sums are ordered by the thread count).
    stages = {"settings": asdict(settings), "torch_threads": torch.get_num_threads()}
    steps = [("profile", profile_stage(settings, model_dir)), ("report", report_stage(settings, out, model_dir)),
             ("prune", prune_stage(settings, out, model_dir)), ("merge", merge_stage(settings, out, model_dir)),
             ("quantize", quantize_stage(settings, out, model_dir)),
             ("gate", gate_stage(settings, out, model_dir))]
    if mlx_installed():
        steps.append(("mlx", mlx_stage(settings, out, model_dir)))
    for number, (name, build) in enumerate(steps, 1):
        log(f"stage {number}/{len(steps) + 1}: {name}")
        stages[name] = run_stage(out, name, build, log)
    data = {"findings": findings(stages), "stages": stages}
    write_atomic(out / "findings.json", json.dumps(data, indent=1) + "\n")
    write_atomic(out / "findings.md", findings_markdown(data))
    index = out / "index.html"
    write_atomic(index, index_html(data))
    return index


