"""`moescope demo --quick`: every stage runs on the embedded model, the findings come from measured
values, and a rerun redoes only the stages that are not complete."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moescope.backends.hf.loading import Placement
from moescope.backends.mlx.loading import mlx_installed
from moescope.calibration import DEMO_MODEL
from moescope.report.demo import DemoSettings, run_demo
from moescope.report.findings import findings
from moescope.report.findings_page import findings_markdown, markdown_structure
from moescope.report.verdicts import FINDING_VERDICTS

ROOT = Path(__file__).resolve().parent.parent

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
        assert row["verdict"] in FINDING_VERDICTS and row["rule"] and row["seeds"] and re.search(r"\d", row["measured"])
    stages = data["stages"]
    replay = stages["prune"]["replay"]
    # the -1e9 row is the seeds' flaw: some selections still reach "pruned" experts; the mask gets none, and
    # the removed model routes exactly as the masked original (softmax-then-top-k: the family says so)
    assert replay["row_1e9"]["pruned"] > 0 and replay["mask"]["pruned"] == 0
    assert replay["remove"]["exact"] and replay["remove"]["max_share"] <= replay["remove"]["tolerance"]
    assert f"{replay['row_1e9']['pruned']} of {replay['row_1e9']['selections']} selections" in \
        data["findings"][5]["measured"]
    assert stages["gate"]["recommended"]["verdict"] in ("pass", "warn", "fail")
    assert data["findings"] == findings(stages)  # the verdicts are the rules applied to the stored measurements


def test_findings_doc_is_generated_and_the_committed_one_matches_in_structure(demo_run, tmp_path):
    out, _, _ = demo_run
    data = json.loads((out / "findings.json").read_text())
    assert (out / "findings.md").read_text() == findings_markdown(data)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "findings_doc.py"), str(out), "--out",
                    str(tmp_path / "findings.md")], check=True, capture_output=True)
    assert (tmp_path / "findings.md").read_text() == findings_markdown(data)
    committed = markdown_structure((ROOT / "docs" / "findings.md").read_text())
    assert committed == markdown_structure(findings_markdown(data)), \
        "docs/findings.md is stale: run `moescope demo --out runs/demo && python scripts/findings_doc.py runs/demo`"


@pytest.mark.skipif(not mlx_installed(), reason="needs moescope[mlx]")
def test_mlx_stage_serves_what_torch_measured(demo_run):
    out, _, _ = demo_run
    data = json.loads((out / "findings.json").read_text())
    run, row = data["stages"]["mlx"], data["findings"][-1]
    assert run["selections"] > 0 and run["selections_differing"] == 0  # float32: the MLX profile is torch's
    assert run["served_perplexity"] == pytest.approx(run["predicted_perplexity"], rel=1e-4)
    assert run["served_bits"] >= run["tiered_bits"] - 1e-9  # coarsened up, never below the plan on average
    assert run["expert_disk_bytes"] > 0 and row["verdict"] == "yes" and "on disk" in row["measured"]
def test_merge_stage_compares_removal_and_merging_with_and_without_repair(demo_run):
    out, _, _ = demo_run
    data = json.loads((out / "findings.json").read_text())
    merge = data["stages"]["merge"]
    assert merge["criterion"] == DemoSettings.make(quick=True).merge_criterion
    assert set(merge["points"]) == {"0.1", "0.25"}
    for point in merge["points"].values():
        losses = {v: point["variants"][v]["loss"] for v in point["contenders"]}
        assert len(losses) == 4 and point["winner"] == min(losses, key=losses.get)
        assert {"remove", "merge"} <= {v.split()[0] for v in losses}
        assert any(v.endswith("+repair") for v in losses)
    rows = [r for r in data["findings"] if "Merging experts" in r["claim"]]
    assert len(rows) == 1 and rows[0]["verdict"] in FINDING_VERDICTS and "hc-smoe" in rows[0]["measured"]


def test_rerun_skips_complete_stages(demo_run):
    out, _, _ = demo_run
    shutil.rmtree(out / "gate")
    logs: list[str] = []
    run_demo(out, DemoSettings.make(quick=True), log=logs.append)
    assert "[profile] already complete, skipped" in logs and "[prune] already complete, skipped" in logs
    assert "[gate] running" in logs and (out / "gate" / "stage.json").is_file()
