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
    "device_agreement.py": (["--seq-len", "32", "--sequences", "1"], "token-layer choices that differ:"),
    "mlx_backend.py": (["--families", "qwen3_moe", "--repeats", "1"], "MLX with capture / without:"),
    "packed_experts.py": (["--rounds", "1", "--tokens", "4", "--sequences", "1", "--calibration-tokens", "256"],
                          "perplexity under MLX"),
    "profile_breakdown.py": (["--generate", "2", "--top", "3"], "op calls"),
    "profile_overhead.py": (["--prompts", "4", "--tokens", "16", "--batch-size", "2", "--rounds", "1", "--generate",
                             "2", "--generate-prompts", "2", "--generate-tokens", "16"],
                            "peak RSS:"),
    "ray_scaling.py": (["--prompts", "4", "--hidden", "64", "--layers", "1", "--max-tokens", "16", "--rounds", "1"],
                       "2 workers / 1 worker:"),
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
    monkeypatch.syspath_prepend(str(path.parent))  # as `python SCRIPT` would: a script may import its neighbours
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None)
    assert expected in capsys.readouterr().out
