"""`moescope demo --quick`: every stage runs on the embedded model, the findings come from measured
values, and a rerun redoes only the stages that are not complete."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from moescope.backends.hf.loading import Placement
from moescope.backends.mlx.loading import mlx_installed
from moescope.calibration import DEMO_MODEL
from moescope.report.demo import DemoSettings, run_demo

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").is_file(), reason="demo model not built")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    logs: list[str] = []
    # --device auto: accelerate's device map, everything on the CPU here (the other tests use the default)
    index = run_demo(out, DemoSettings.make(quick=True, placement=Placement("auto", "float32")), log=logs.append)
    return out, index, logs


def test_outputs_are_complete(demo_run):
    out, index, _ = demo_run
    assert index == out / "index.html"
    for path in ["profile/full/profile.json", "profile/english/stats.safetensors", "report/report.html",
                 "prune/sweep.csv", "prune/sweep-english.csv", "prune/bad-model/config.json",
                 "quantize/recommended-model/bit_plan.json", "gate/gate-bad.html", "gate/gate-recommended.json",
                 "report/accuracy.json", "merge/sweep.csv", "merge/sweep.svg"] + \
            (["mlx/model/bit_plan.json", "mlx/profile/profile.json"] if mlx_installed() else []):
        assert (out / path).is_file(), path
    assert not list(out.glob(".*.partial"))
    html = index.read_text()
    assert "report/report.html" in html and "<table>" in html
    assert "<h2>Accuracy per expert</h2>" in (out / "report" / "report.html").read_text()


def test_findings_are_filled_from_measured_values(demo_run):
    out, _, _ = demo_run
    data = json.loads((out / "findings.json").read_text())
    assert len(data["findings"]) == 8 + mlx_installed()
    for row in data["findings"]:
        assert isinstance(row["agrees"], bool) and re.search(r"\d", row["measured"])
    stages = data["stages"]
    # the -1e9 row is the seeds' flaw: some selections still reach "pruned" experts, masks get none
    assert stages["prune"]["replay"]["row_1e9"] > 0
    assert stages["prune"]["replay"]["mask"] == stages["prune"]["replay"]["remove"] == 0
    assert stages["gate"]["recommended"]["verdict"] in ("pass", "warn", "fail")
    measured = [row["measured"] for row in data["findings"]]
    assert f"{stages['prune']['replay']['row_1e9']} selections" in measured[5]


@pytest.mark.skipif(not mlx_installed(), reason="needs moescope[mlx]")
def test_mlx_stage_serves_what_torch_measured(demo_run):
    out, _, _ = demo_run
    data = json.loads((out / "findings.json").read_text())
    run, row = data["stages"]["mlx"], data["findings"][-1]
    assert run["selections"] > 0 and run["selections_differing"] == 0  # float32: the MLX profile is torch's
    assert run["served_perplexity"] == pytest.approx(run["predicted_perplexity"], rel=1e-4)
    assert run["served_bits"] >= run["tiered_bits"] - 1e-9  # coarsened up, never below the plan on average
    assert run["expert_disk_bytes"] > 0 and row["agrees"] is True and "on disk" in row["measured"]
def test_merge_stage_compares_removal_and_merging_with_and_without_repair(demo_run):
    out, _, _ = demo_run
    data = json.loads((out / "findings.json").read_text())
    merge = data["stages"]["merge"]
    assert merge["criterion"] == data["stages"]["prune"]["best_criterion"]
    assert set(merge["points"]) == {"0.1", "0.25"}
    for point in merge["points"].values():
        losses = {v: point["variants"][v]["loss"] for v in point["contenders"]}
        assert len(losses) == 4 and point["winner"] == min(losses, key=losses.get)
        assert {"remove", "merge"} <= {v.split()[0] for v in losses}
        assert any(v.endswith("+repair") for v in losses)
    rows = [r for r in data["findings"] if "Merging experts" in r["claim"]]
    loss = merge["points"]["0.25"]["variants"][merge["points"]["0.25"]["merge"]]["loss"]
    assert len(rows) == 1 and f"{loss:+.1%}" in rows[0]["measured"]


def test_rerun_skips_complete_stages(demo_run):
    out, _, _ = demo_run
    shutil.rmtree(out / "gate")
    logs: list[str] = []
    run_demo(out, DemoSettings.make(quick=True), log=logs.append)
    assert "[profile] already complete, skipped" in logs and "[prune] already complete, skipped" in logs
    assert "[gate] running" in logs and (out / "gate" / "stage.json").is_file()
