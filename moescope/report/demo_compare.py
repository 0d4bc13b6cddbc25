"""The demo's stages beyond the seeds' pipeline: removal against merging with and without router repair
(`merge`), and the model under mlx-lm (`mlx`, with the moescope[mlx] extra)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from moescope.analysis.tiers import TierOptions, tier_bit_plan
from moescope.backends.hf.loading import Placement, load_model, load_tokenizer
from moescope.backends.select import open_model
from moescope.calibration import ASSETS, CALIBRATION, HELDOUT
from moescope.compress.mlx_quantize import quantize_mlx
from moescope.compress.quant.apply import apply_bit_plan
from moescope.judge.evaluate import evaluate, group_perplexities, load_windows
from moescope.judge.nll import geometric_mean
from moescope.judge.sweep import sweep_prune, write_csv
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import Profile
from moescope.report.charts import REPAIRED, plot_sweep
from moescope.report.demo_settings import DemoSettings, load_prompts, protocol, window_means
from moescope.report.extra_findings import merge_variants


def merge_stage(settings: DemoSettings, out: Path, model_dir: Path) -> Callable[[Path], dict]:
    """Removal by the criterion chosen in advance against merging, each as written and after router repair."""
    def build(work: Path) -> dict:
        per_window: dict = {}
        rows = sweep_prune(str(model_dir), str(out / "profile" / "full"), list(settings.merge_ratios),
                           [settings.merge_criterion], ["remove", "merge"], str(HELDOUT), protocol(settings),
                           str(CALIBRATION), merge_methods=settings.merge_methods, repair=True,
                           calibration_prompts=settings.calibration_prompts, repair_steps=settings.repair_steps,
                           per_window=per_window)
        write_csv(rows, work / "sweep.csv")
        (work / "sweep.svg").write_text(plot_sweep(rows, series="variant", xlabel="share of experts fewer per layer"))
        return {**merge_summary(rows, settings.merge_criterion), "windows": window_means(per_window)}

    return build


def merge_summary(rows: list[dict], criterion: str) -> dict:
    """Per ratio: each variant's perplexity change (geometric mean over every domain and language) and per
    domain (over its languages); the merge method that lost least; the winner of the four contenders
    (removal, that merge, each with and without repair), for the chart and the table. The findings judge
    every merge method, not only this one (moescope.report.extra_findings)."""
    points = {}
    for ratio in sorted({r["ratio"] for r in rows if r["variant"] != "none"}):
        variants = {}
        for variant in dict.fromkeys(r["variant"] for r in rows if r["ratio"] == ratio):
            chosen = [r for r in rows if r["ratio"] == ratio and r["variant"] == variant]
            domains = {d: geometric_mean([r["vs_baseline"] for r in chosen if r["domain"] == d])
                       for d in sorted({r["domain"] for r in chosen})}
            variants[variant] = {"loss": geometric_mean([r["vs_baseline"] for r in chosen]) - 1, "domains": domains}
        merges = merge_variants(variants)
        merge = min(merges, key=lambda v: variants[v]["loss"])
        contenders = [f"remove {criterion}", f"remove {criterion}{REPAIRED}", merge, f"{merge}{REPAIRED}"]
        points[f"{ratio:g}"] = {"variants": variants, "merge": merge, "contenders": contenders,
                                "winner": min(contenders, key=lambda v: variants[v]["loss"])}
    return {"criterion": criterion, "points": points}


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
