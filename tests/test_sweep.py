"""`moescope sweep prune` on a real tiny checkpoint: one row per point and group, a baseline of 1, a plot."""

from __future__ import annotations

import csv
import json

from helpers import WORDS, save_with_tokenizer, tokenizer, write_calibration

from moescope.cli import main
from moescope.profile import ProfileOptions, profile_model
from moescope.tiny import tiny_model


def test_sweep_cli_writes_csv_and_plot(tmp_path, capsys):
    model = tiny_model("olmoe")
    save_with_tokenizer(model, tmp_path / "model")
    profile_model(model, tokenizer(), write_calibration(tmp_path / "cal.jsonl", 9), tmp_path / "profile",
                  ProfileOptions(progress=False))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "domain": ["math", "code"][i % 2], "lang": "en",
                                        "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40))}) + "\n"
                            for i in range(8)))
    assert main(["sweep", "prune", str(tmp_path / "model"), "--profile", str(tmp_path / "profile"),
                 "--ratios", "0.125,0.25", "--criteria", "frequency,gate-mass", "--data", str(data),
                 "--seq-len", "16", "--sequences", "4", "--dtype", "float32", "--out", str(tmp_path / "sweep")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert len(rows) == 2 + 2 * 2 * 2  # baseline per group + criteria x ratios x groups
    assert {float(r["vs_baseline"]) for r in rows if r["criterion"] == "none"} == {1.0}
    assert {int(r["experts_pruned"]) for r in rows if r["criterion"] != "none"} == {2, 4}
    assert any(float(r["vs_baseline"]) != 1.0 for r in rows if r["criterion"] != "none")
    svg = (tmp_path / "sweep" / "sweep.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 * 2  # criteria x domains
    assert "sweep.svg" in capsys.readouterr().out
