"""Every script in benchmarks/ runs end to end at tiny sizes, so that none can rot unnoticed (the figures
they print at full size are in the README and docs, each with the commit it was measured on). Each runs
in this process as `python SCRIPT ARGS` would (runpy), which saves a torch import per script."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = {  # script -> (tiny arguments, a line its report must print)
    "bootstrap_coverage.py": (["--trials", "1", "--population", "200"], "x nominal"),
    "capture_overhead.py": (["--repeats", "1", "--layers", "1", "--tokens", "16"], "capture overhead ratio:"),
    "profile_overhead.py": (["--prompts", "4", "--tokens", "16", "--batch-size", "2", "--rounds", "1"],
                            "peak memory ratio 10x tokens / 1x:"),
    "quant_quality.py": (["--bits", "3", "--seq-len", "32", "--windows", "1", "--distortion-windows", "1",
                          "--calibration-prompts", "8", "--speed-rounds", "1"], "speed fake-quantised / original:"),
    "quantize_speed.py": (["--experts", "2", "--out", "32", "--in", "128", "--rounds", "1"], "mse"),
    "rewrite.py": (["--size-gb", "0.01"], "rewrite time / plain copy:"),
    "stats_speed.py": (["--layers", "3", "--experts", "16", "--top-k", "2", "--prompts", "10", "--domains", "3",
                        "--coactivation"], "x the 2 s target"),
}


def test_every_benchmark_has_a_smoke_run():
    assert sorted(SMOKE) == sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_small(script, tmp_path, monkeypatch, capsys):
    args, expected = SMOKE[script]
    path = ROOT / "benchmarks" / script
    monkeypatch.chdir(tmp_path)  # rewrite.py works in a temporary directory under the current one
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None)
    assert expected in capsys.readouterr().out
