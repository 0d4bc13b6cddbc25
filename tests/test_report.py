"""The HTML report: self-contained, every section present or its absence explained, written
atomically, and (when Chromium is installed) rendered headless with no console errors and plots
that actually draw."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import tokenizer, write_calibration

from moescope.analysis.analyse import StatsOptions, analyse
from moescope.cli import main
from moescope.profiling.run import ProfileOptions, profile_model
from moescope.profiling.store import Profile
from moescope.report.charts import png_data_uri
from moescope.report.page import report_html, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAST = ["--bootstrap", "20", "--orderings", "10"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    from moescope.models.tiny import tiny_model

    tmp = tmp_path_factory.mktemp("report")
    prompts = write_calibration(tmp / "cal.jsonl", 12)
    profile = profile_model(tiny_model("qwen3_moe"), tokenizer(), prompts, tmp / "profile",
                            ProfileOptions(progress=False, coactivation=True))
    return tmp, profile


def test_png_is_a_valid_image():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    png = base64.b64decode(png_data_uri(rgb).split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    start = png.index(b"IDAT") + 4
    raw = zlib.decompress(png[start: start + int.from_bytes(png[start - 8: start - 4], "big")])
    assert raw == b"\x00" + rgb[0].tobytes() + b"\x00" + rgb[1].tobytes()


def test_report_is_self_contained(profiled, capsys):
    tmp, _ = profiled
    out = tmp / "report.html"
    assert main(["report", str(tmp / "profile"), "--out", str(out), *FAST]) == 0
    text = out.read_text()
    for heading in ("Summary", "Expert load per layer", "Dead experts vs sample size", "Balance per layer",
                    "Routing weights", "Specificity", "Tiers per layer", "Co-activation", "Per layer"):
        assert f"<h2>{heading}</h2>" in text
    assert "bands = 95 % bootstrap intervals over prompts" in text
    assert len(re.findall(r"<td>\d\.\d+ \[\d\.\d+, \d\.\d+\]</td>", text)) == 2 * 3  # 2 layers x 3 intervals
    assert text.count("<svg") >= 8 and "<script" not in text and "Missing from this profile" not in text
    links = re.findall(r'(?:href|src)="([^"]*)"', text)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) == {"http://www.w3.org/2000/svg"}  # SVG namespace only
    assert not list(tmp.glob(".*partial"))


def test_missing_counters_are_explained(profiled, tmp_path):
    _, profile = profiled
    counters = {k: v for k, v in profile.counters.items() if k != "coactivation"}
    counters.update(presence=counters["presence"][:1], prompt_tokens=counters["prompt_tokens"][:1])
    thin = Profile(profile.model, profile.layers, profile.settings, profile.domains, profile.langs,
                   profile.prompts[:1], counters)
    text = report_html(thin, analyse(thin, StatsOptions(bootstrap=10, orderings=5)))
    assert "Missing from this profile" in text and "profile with --coactivation" in text
    assert "Needs at least 2 prompts" in text and "need at least 2" in text


def test_profile_without_per_prompt_counts_says_what_is_missing(profiled, tmp_path, capsys):
    """A profile from before per-prompt counts (or --no-prompt-counts): figures without intervals, and why."""
    tmp, _ = profiled
    old = Profile.load(tmp / "profile")
    del old.counters["prompt_counts"]
    old.save(tmp_path / "old")
    assert main(["report", str(tmp_path / "old"), "--out", str(tmp_path / "r.html"), *FAST]) == 0
    text = (tmp_path / "r.html").read_text()
    assert "Missing from this profile" in text and "no per-prompt selection counts" in text
    assert "no intervals: see what is missing" in text and "<h2>Balance per layer</h2>" in text
    assert main(["stats", str(tmp_path / "old"), *FAST]) == 0
    out = capsys.readouterr().out
    assert "Not shown: intervals of entropy ratio, Gini and top-n share" in out
    assert "bootstrap intervals over prompts" not in out


def test_zero_tokens_and_bad_thresholds(profiled, tmp_path, capsys):
    tmp, profile = profiled
    Profile.empty(profile.model, profile.layers, profile.settings, ["prose"], ["en"]).save(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert main(["report", str(tmp / "profile"), "--out", str(tmp_path / "r.html"), "--prune-below", "-1"]) == 2
    err = capsys.readouterr().err
    assert "no tokens" in err and "out of range" in err and not (tmp_path / "r.html").exists()


def chromium(tmp, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=120)


CHECKER = """<!doctype html><html><body><pre id="result">pending</pre><script>
const img = new Image();
img.onload = () => {
  const canvas = document.createElement("canvas");
  canvas.width = img.width; canvas.height = img.height;
  const ctx = canvas.getContext("2d"); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, img.width, img.height).data;
  let coloured = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) coloured++;
  document.getElementById("result").textContent = "coloured " + coloured + " of " + img.width * img.height;
};
img.src = "data:image/png;base64,SHOT";
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(profiled, tmp_path):
    tmp, profile = profiled
    write_report(profile, analyse(profile, StatsOptions(bootstrap=20, orderings=10)), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    result = chromium(tmp_path, "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1200,3000",
                      (tmp_path / "report.html").as_uri())
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert shot.exists() and not console, console
    # Chromium decodes its own screenshot: text is grey, so coloured pixels come from the plots.
    checker = tmp_path / "checker.html"
    checker.write_text(CHECKER.replace("SHOT", base64.b64encode(shot.read_bytes()).decode()))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", checker.as_uri()).stdout
    coloured, total = map(int, re.search(r"coloured (\d+) of (\d+)", dom).groups())
    assert coloured > 0.02 * total, (coloured, total)


def test_speed_benchmark_runs_small():
    script = Path(__file__).parents[1] / "benchmarks" / "stats_speed.py"
    result = subprocess.run([sys.executable, str(script), "--layers", "3", "--experts", "16", "--top-k", "2",
                             "--prompts", "10", "--domains", "3", "--coactivation"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "x the 2 s target" in result.stdout
