"""`moescope demo`: the whole pipeline on the embedded model, ending in one HTML page of findings.

Stages, each in its own directory under --out and skipped when already complete (so an interrupted
run resumes where it stopped):

  profile   the full calibration set and the English-only one, with generation
  report    routing statistics with error bars and the HTML report of the full profile
  prune     sweep of criteria x ratios (remove), English-only calibration, replay of remove/mask/-1e9
  merge     removal (the best criterion) vs merging, each with and without router repair, at equal
            expert counts
  quantize  uniform vs tiered vs budget-allocated bits at equal average bits
  gate      the regression gate on the recommended model and on a deliberately bad one
  mlx       (with the moescope[mlx] extra) the model profiled under mlx-lm, its tiered plan written as a
            really quantised mlx-lm model and evaluated against the original
  index     index.html: the seeds' claims next to what this run measured

Every figure on the final page comes from this run; `--quick` shrinks every stage for tests.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from moescope.analysis.analyse import analyse
from moescope.analysis.criteria import profile_scores
from moescope.analysis.selection import make_prune_plan
from moescope.analysis.tiers import TierOptions, tier_bit_plan
from moescope.backends.hf.loading import Placement, load_model, load_tokenizer
from moescope.backends.mlx.loading import mlx_installed
from moescope.backends.select import open_model
from moescope.calibration import ASSETS, CALIBRATION, DEMO_MODEL, HELDOUT, PROBES, load_calibration
from moescope.compress.checkpoint import save_model_checkpoint
from moescope.compress.mlx_quantize import quantize_mlx
from moescope.compress.prune import offsets_for, prune_checkpoint, replay, replay_batches, routing_offsets
from moescope.compress.quant.allocation import budget_plan
from moescope.compress.quant.apply import apply_bit_plan, uniform_plan
from moescope.compress.quant.distortion import weight_distortion
from moescope.compress.repair import REPAIR_STEPS
from moescope.errors import MoescopeError
from moescope.judge.accuracy import expert_accuracy, load_items
from moescope.judge.evaluate import Protocol, evaluate, group_perplexities, load_windows
from moescope.judge.gate import GateOptions, gate
from moescope.judge.nll import geometric_mean
from moescope.judge.sweep import sweep_prune, write_csv
from moescope.output import write_atomic
from moescope.plans import bit_plan_text, save_bit_plan
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import Profile
from moescope.report.charts import REPAIRED, plot_sweep
from moescope.report.findings import findings, index_html, mlx_findings
from moescope.report.gate_page import render_html
from moescope.report.page import write_report


@dataclass
class DemoSettings:
    quick: bool = False
    generate: int = 8  # generated tokens profiled per prompt
    prompts: int | None = None  # calibration prompts per set (None: all)
    ratios: tuple[float, ...] = (0.05, 0.1, 0.25)
    criteria: tuple[str, ...] = ("frequency", "gate-mass", "saliency")
    seq_len: int = 256
    sequences: int = 16  # held-out windows per domain and language
    probes: int | None = None
    max_new_tokens: int = 48
    bad_ratio: float = 0.25
    items: int | None = None  # labelled multiple-choice items for per-expert accuracy (None: all)
    merge_ratios: tuple[float, ...] = (0.1, 0.25)  # shares of experts fewer, removal vs merging
    merge_methods: tuple[str, ...] = ("hc-smoe", "m-smoe")
    calibration_prompts: int = 128  # prompts merged router rows are fitted on and repaired routers matched on
    repair_steps: int = REPAIR_STEPS
    # float32 by default: the demo model is trained in float32, and bf16 matmuls are slower on CPU
    placement: Placement = field(default_factory=lambda: Placement(dtype="float32"))

    @classmethod
    def make(cls, quick: bool, placement: Placement | None = None) -> DemoSettings:
        where = {"placement": placement} if placement else {}
        if not quick:
            return cls(**where)
        return cls(quick=True, generate=2, prompts=36, ratios=(0.1, 0.25), criteria=("frequency", "gate-mass"),
                   seq_len=128, sequences=2, probes=12, max_new_tokens=12, items=40, merge_methods=("hc-smoe",),
                   calibration_prompts=16, repair_steps=20, **where)


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


def load_prompts(path: Path, limit: int | None):
    """The first `limit` prompts of each domain (all when None), in file order."""

    prompts = load_calibration(path)
    if limit is None:
        return prompts
    per_domain = max(1, limit // len({p.domain for p in prompts}))
    seen: dict[str, int] = {}
    kept = []
    for prompt in prompts:
        seen[prompt.domain] = seen.get(prompt.domain, 0) + 1
        if seen[prompt.domain] <= per_domain:
            kept.append(prompt)
    return kept


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
        curve = analysis.curve
        layers = analysis.layers
        return {"dead": analysis.summary["dead"], "experts": analysis.summary["experts"],
                "dead_at_1_prompt": first_at(curve, 1), "dead_at_5_prompts": first_at(curve, 5),
                "dead_at_all_prompts": float(curve["dead_mean"][-1]),
                "prompts": analysis.summary["prompts"], "unseen": analysis.summary["unseen"],
                "entropy_ratio": min(layer["entropy_ratio"] for layer in layers),
                "gini": max(layer["gini"] for layer in layers),
                "top_ratio": max(layer["top_ratio"] for layer in layers),
                "items": accuracy["items"], "item_accuracy": accuracy["accuracy"]}

    return build


def first_at(curve: dict, prompts: int) -> float:
    """Dead experts (all layers) on the sample-size curve at the first point with >= `prompts` prompts."""
    for n, dead in zip(curve["n"], curve["dead_mean"]):
        if n >= prompts:
            return float(dead)
    return float(curve["dead_mean"][-1])


def protocol(settings: DemoSettings):
    return Protocol(seq_len=settings.seq_len, sequences=settings.sequences, placement=settings.placement)


def loss_at(rows: list[dict], criterion: str, ratio: float) -> float:
    """Geometric-mean perplexity ratio to the unpruned model, minus 1, for one sweep point."""

    ratios = [r["vs_baseline"] for r in rows if r["criterion"] == criterion and r["ratio"] == ratio]
    return geometric_mean(ratios) - 1


def prune_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    def build(work: Path) -> dict:

        heldout = str(HELDOUT)
        full, english = out / "profile" / "full", out / "profile" / "english"
        rows = sweep_prune(str(model_dir), str(full), list(settings.ratios), list(settings.criteria), "remove",
                           heldout, protocol(settings))
        write_csv(rows, work / "sweep.csv")
        (work / "sweep.svg").write_text(plot_sweep(rows))
        biased = sweep_prune(str(model_dir), str(english), [settings.bad_ratio], ["frequency"], "remove", heldout,
                             protocol(settings))
        write_csv(biased, work / "sweep-english.csv")
        mid = sorted(settings.ratios)[len(settings.ratios) // 2]
        losses = {c: loss_at(rows, c, mid) for c in settings.criteria}
        best = min((c for c in settings.criteria if c != "frequency"), key=losses.get)
        balanced = {(r["domain"], r["lang"]): r["vs_baseline"] for r in rows
                    if r["criterion"] == "frequency" and r["ratio"] == settings.bad_ratio}
        bias = {f"{d}/{g}": ratio / balanced[(d, g)] for r in biased if r["criterion"] == "frequency"
                for d, g, ratio in [(r["domain"], r["lang"], r["vs_baseline"])]}
        worst_group = max(bias, key=bias.get)

        plan = make_prune_plan(Profile.load(full), "frequency", ratio=settings.bad_ratio, profile_path=str(full))
        plan.save(work / "plan-frequency.json")
        batches = replay_batches(model_dir, str(CALIBRATION), 32, 128)
        model = load_model(model_dir, settings.placement)
        with routing_offsets(model, offsets_for(plan)):
            masked = replay(model, batches, plan.prune)
        row_model = load_model(prune_checkpoint(model_dir, work / "row-1e9", plan, "row-1e9"), settings.placement)
        row = replay(row_model, batches, plan.prune)
        shutil.rmtree(work / "row-1e9")
        removed_dir = prune_checkpoint(model_dir, work / "removed", plan, "remove")
        removed = replay(load_model(removed_dir, settings.placement), batches, {})
        shutil.rmtree(removed_dir)
        bad_plan = make_prune_plan(Profile.load(english), "frequency", ratio=settings.bad_ratio,
                                   profile_path=str(english))
        prune_checkpoint(model_dir, work / "bad-model", bad_plan, "remove")
        return {"ratio_compared": mid, "loss_by_criterion": losses, "best_criterion": best,
                "best_vs_frequency": losses[best] / losses["frequency"] if losses["frequency"] else None,
                "english_bias": bias, "english_worst_group": worst_group, "english_worst_ratio": bias[worst_group],
                "frequency_loss_at_smallest": loss_at(rows, "frequency", min(settings.ratios)),
                "smallest_ratio": min(settings.ratios),
                "replay": {"mask": masked.pruned_total, "remove": removed.pruned_total, "row_1e9": row.pruned_total,
                           "row_1e9_share": row.pruned_total / max(1, sum(row.selections.values()))}}

    return build


def merge_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    """Removal by the prune stage's best criterion against merging, each as written and after router repair."""
    def build(work: Path) -> dict:
        best = json.loads((out / "prune" / "stage.json").read_text())["best_criterion"]
        rows = sweep_prune(str(model_dir), str(out / "profile" / "full"), list(settings.merge_ratios), [best],
                           ["remove", "merge"], str(HELDOUT), protocol(settings), str(CALIBRATION),
                           merge_methods=settings.merge_methods, repair=True,
                           calibration_prompts=settings.calibration_prompts, repair_steps=settings.repair_steps)
        write_csv(rows, work / "sweep.csv")
        (work / "sweep.svg").write_text(plot_sweep(rows, series="variant", xlabel="share of experts fewer per layer"))
        return merge_summary(rows, best)

    return build


def merge_summary(rows: list[dict], criterion: str) -> dict:
    """Per ratio: each variant's perplexity change (geometric mean over every domain and language, as
    `loss_at`) and per domain (over its languages); the best merge method; the winner of the four
    contenders (removal, merging, each with and without repair)."""
    points = {}
    for ratio in sorted({r["ratio"] for r in rows if r["variant"] != "none"}):
        variants = {}
        for variant in dict.fromkeys(r["variant"] for r in rows if r["ratio"] == ratio):
            chosen = [r for r in rows if r["ratio"] == ratio and r["variant"] == variant]
            domains = {d: geometric_mean([r["vs_baseline"] for r in chosen if r["domain"] == d])
                       for d in sorted({r["domain"] for r in chosen})}
            variants[variant] = {"loss": geometric_mean([r["vs_baseline"] for r in chosen]) - 1, "domains": domains}
        merges = [v for v in variants if v.startswith("merge ") and not v.endswith(REPAIRED)]
        merge = min(merges, key=lambda v: variants[v]["loss"])
        contenders = [f"remove {criterion}", f"remove {criterion}{REPAIRED}", merge, f"{merge}{REPAIRED}"]
        points[f"{ratio:g}"] = {"variants": variants, "merge": merge, "contenders": contenders,
                                "winner": min(contenders, key=lambda v: variants[v]["loss"])}
    return {"criterion": criterion, "points": points}


def quantize_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    def build(work: Path) -> dict:


        full = out / "profile" / "full"
        profile = Profile.load(full)
        model = load_model(model_dir, settings.placement)
        windows = load_windows(HELDOUT, load_tokenizer(model_dir), protocol(settings), model)
        base = geometric_mean(group_perplexities(model, windows).values())
        tiered, _ = tier_bit_plan(profile, TierOptions(), str(full))
        average = float(np.mean([b for bits in tiered.layers.values() for b in bits]))
        importance = profile_scores(profile, "gate-mass")
        distortion = weight_distortion(model)
        plans = {"uniform-4": uniform_plan(model, 4), "uniform-3": uniform_plan(model, 3), "tiered": tiered,
                 "budget-at-tiered-bits": budget_plan(model, importance, distortion, avg_bits=average),
                 "budget-3": budget_plan(model, importance, distortion, avg_bits=3.0)}
        results = {}
        for name, plan in plans.items():
            save_bit_plan(plan, work / f"{name}.json")
            quantised = apply_bit_plan(load_model(model_dir, settings.placement), plan)
            ppl = geometric_mean(group_perplexities(quantised, windows).values())
            bits = [b for layer in plan.layers.values() for b in layer]
            results[name] = {"average_bits": float(np.mean(bits)), "perplexity": ppl, "loss": ppl / base - 1}
            if name == "tiered":
                save_model_checkpoint(quantised, model_dir, work / "recommended-model",
                                      {"bit_plan.json": bit_plan_text(plan)})
        return {"baseline_perplexity": base, "plans": results, "recommended": "tiered"}

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


def mlx_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    """The model under mlx-lm: profiled (and compared with the torch profile of the same prompts), its tiered
    plan written as a really quantised mlx-lm model, that model evaluated against the original, and the
    perplexity torch predicts for the same plan (`quantize --plan` with MLX's scales)."""

    def build(work: Path) -> dict:
        tokenizer = load_tokenizer(model_dir)
        prompts = load_prompts(ASSETS / "calibration.jsonl", settings.prompts)
        options = ProfileOptions(generate=settings.generate, saliency=True, coactivation=True)
        profile = profile_model(open_model(model_dir, "mlx", dtype="float32"), tokenizer, prompts, work / "profile",
                                options)
        torch_selections = Profile.load(out / "profile" / "full").counters["selections"]
        selections = profile.counters["selections"]
        tiered, _ = tier_bit_plan(profile, TierOptions(), str(work / "profile"))
        served = quantize_mlx(model_dir, work / "model", tiered)
        mlx_protocol = replace(protocol(settings), backend="mlx", baseline_backend="hf")
        report = evaluate(str(work / "model"), mlx_protocol, str(HELDOUT), str(model_dir))
        predicted = apply_bit_plan(load_model(model_dir, Placement(dtype="float32")), served.plan)
        windows = load_windows(HELDOUT, tokenizer, protocol(settings), predicted)
        predicted_ppl = geometric_mean(group_perplexities(predicted, windows).values())
        base = report["baseline_perplexity_geomean"]
        return {"selections": int(torch_selections.sum()),
                "selections_differing": int(np.abs(selections - torch_selections).sum() // 2),
                "tiered_bits": tiered.average_bits(), "served_bits": served.plan.average_bits(),
                "disk_bytes": served.disk.total_bytes, "expert_disk_bytes": served.disk.expert_bytes,
                "planned_bytes": served.estimate.total_bytes, "expert_planned_bytes": served.estimate.expert_bytes,
                "baseline_perplexity": base, "served_perplexity": report["perplexity_geomean"],
                "predicted_perplexity": predicted_ppl, "served_loss": report["perplexity_geomean"] / base - 1,
                "predicted_loss": predicted_ppl / base - 1,
                "kl": float(np.mean([g["kl"] for g in report["groups"].values()]))}

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
    rows = findings(stages) + mlx_findings(stages)
    write_atomic(out / "findings.json", json.dumps({"findings": rows, "stages": stages}, indent=2) + "\n")
    index = out / "index.html"
    write_atomic(index, index_html(stages, rows))
    return index


