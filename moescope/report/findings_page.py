"""The demo's index page and `docs/findings.md`, both rendered from one findings.json (findings + stages).

`python scripts/findings_doc.py runs/demo` writes docs/findings.md from a run; tests/test_demo.py
fails when the committed file and a fresh run disagree in structure (headings, claims and rules).
"""

from __future__ import annotations

import html
import json
import re

from moescope.report.verdicts import change, plan_losses, span


def quant_rows(quant: dict) -> list[dict]:
    """Each quantisation plan: average bits, widths in use, perplexity change with its 95 % interval over the
    held-out windows, and the earlier plan with the same bits for every expert, if any."""
    names = list(quant["plans"])
    point, samples = plan_losses(quant["windows"], ["none", *names])
    rows, seen = [], {}
    for i, name in enumerate(names, 1):
        plan = quant["plans"][name]
        value, ci = change(point, samples, i, 0)
        rows.append({"plan": name, "average_bits": plan["average_bits"], "widths": plan["widths"],
                     "change": span(value, ci, "{:+.2%}"), "same_as": seen.get(plan["bits_hash"], "")})
        seen.setdefault(plan["bits_hash"], name)
    return rows


def pipeline_seconds(stages: dict) -> float:
    return sum(s.get("seconds", 0) for s in stages.values() if isinstance(s, dict))


def index_html(data: dict) -> str:
    """The demo's index page: the findings table first, then the plans, the gate and links to details."""
    e, stages = html.escape, data["stages"]
    table = "".join(
        f"<tr><td>{e(r['claim'])}</td><td>{e(r['seeds'])}</td><td class='rule'>{e(r['rule'])}</td>"
        f"<td>{e(r['measured'])}</td><td class='{r['verdict']}'><b>{r['verdict']}</b>"
        f"{'<br>' + e(r['note']) if r['note'] else ''}</td></tr>" for r in data["findings"])
    quant = "".join(f"<tr><td>{e(q['plan'])}</td><td>{q['average_bits']:.2f}</td>"
                    f"<td>{'/'.join(map(str, q['widths']))}</td><td>{e(q['change'])}</td><td>{e(q['same_as'])}</td>"
                    "</tr>" for q in quant_rows(stages["quantize"]))
    allocation = e(stages["quantize"]["allocation"])
    gates = "".join(f"<li><a href='gate/gate-{name}.html'>{e(name)} model</a>: <b>{e(g['verdict'])}</b> "
                    f"({e(json.dumps(g['prompts_by_verdict']))})</li>" for name, g in stages["gate"].items()
                    if isinstance(g, dict))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>moescope demo</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;width:100%;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.4em .6em;
vertical-align:top;text-align:left}}th{{background:#f3f3f3}}.rule{{font-size:13px;color:#444}}
.yes{{background:#dff3df}}.partly{{background:#fff3cd}}.no{{background:#f8dede}}</style></head><body>
<h1>moescope demo: what the embedded model shows</h1>
<p>Every figure below was measured by this run ({pipeline_seconds(stages):.0f} s of pipeline on this machine).
Model: the embedded Qwen3-MoE demo (moescope/assets/demo-moe); data: the embedded calibration, held-out and
probe sets. The first six claims are the seeds'; the merging and router-repair claims come from the literature
(docs/pruning.md). Each finding's rule was fixed before the run; intervals are 95 %.</p>
<h2>Findings</h2><table><tr><th>The claim</th><th>Its source's figure</th><th>Rule (stated in advance)</th>
<th>This run measured</th><th>Verdict</th></tr>{table}</table>
<h2>Quantisation plans (perplexity vs the unquantised model, geometric mean over domains)</h2>
<p>Budget plans are allocated as <code>moescope quantize --budget</code> does by default: {allocation}.</p>
<table><tr><th>plan</th><th>average bits</th><th>widths</th><th>perplexity change [95 %]</th><th>same bits as</th></tr>
{quant}</table>
<h2>Regression gate</h2><ul>{gates}</ul>
<h2>Details</h2><ul>
<li><a href="report/report.html">Routing report</a> (error bars, sample-size curve, tiers, accuracy per expert)</li>
<li>Pruning sweep: <a href="prune/sweep.svg">plot</a>, <a href="prune/sweep.csv">table</a>;
<a href="prune/sweep-english.csv">English-only calibration</a></li>
<li>Removal vs merging, with and without router repair: <a href="merge/sweep.svg">plot</a>,
<a href="merge/sweep.csv">table</a></li>
<li><a href="findings.json">findings.json</a> (this table, machine-readable)</li></ul>
</body></html>
"""


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def findings_markdown(data: dict) -> str:
    """docs/findings.md: the same findings as the index page, with the run's settings."""
    stages = data["stages"]
    settings = stages["settings"]
    timing = ", ".join(f"{name} {s['seconds']:.0f} s" for name, s in stages.items()
                       if isinstance(s, dict) and "seconds" in s)
    lines = [
        "# Findings on the embedded demo model", "",
        "Generated from a run's `findings.json` by `python scripts/findings_doc.py RUN_DIR` (after `moescope demo "
        "--out RUN_DIR`); do not edit by hand. The same table opens `RUN_DIR/index.html`. "
        f"This run: {stages['report']['prompts']} calibration prompts with {settings['generate']} generated tokens "
        f"each, held-out windows of {settings['seq_len']} tokens ({settings['sequences']} per domain and language), "
        f"pruning ratios {', '.join(f'{r:g}' for r in settings['ratios'])}, {stages['torch_threads']} torch "
        f"thread(s); {pipeline_seconds(stages):.0f} s of pipeline ({timing}).", "",
        "Each finding states its comparison, threshold and uncertainty before the run, shows the seeds' figure "
        "beside ours, and reads yes, partly or no by that rule alone; a comparison that cannot tell says so in its "
        "verdict cell. Intervals are 95 %.", "",
        "## Findings", "",
        "| the claim | its source's figure | rule (stated in advance) | this run measured | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in data["findings"]:
        verdict = f"**{r['verdict']}**" + (f": {cell(r['note'])}" if r["note"] else "")
        lines.append(f"| {cell(r['claim'])} | {cell(r['seeds'])} | {cell(r['rule'])} | {cell(r['measured'])} | "
                     f"{verdict} |")
    lines += ["", "## Quantisation plans", "",
              f"Perplexity change against the unquantised model, geometric mean over the held-out groups. Budget "
              f"plans: {stages['quantize']['allocation']}.", "",
              "| plan | average bits | widths | perplexity change [95 %] | same bits as |", "|---|---|---|---|---|"]
    lines += [f"| {q['plan']} | {q['average_bits']:.2f} | {'/'.join(map(str, q['widths']))} | {q['change']} | "
              f"{q['same_as']} |" for q in quant_rows(stages["quantize"])]
    lines += ["", "## Regression gate", ""]
    for name, g in stages["gate"].items():
        if isinstance(g, dict):
            counts = ", ".join(f"{verdict} {n}" for verdict, n in g["prompts_by_verdict"].items())
            lines.append(f"- {name} model: **{g['verdict']}** ({counts})")
    return "\n".join(lines) + "\n"


def markdown_structure(text: str) -> list:
    """What must not change between runs: the headings, each finding's claim and rule, and the first cell of
    every other table row (the plan names), not the figures measured."""
    structure, section = [], ""
    for line in text.splitlines():
        if line.startswith("#"):
            structure.append(line)
            section = line
        elif line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            structure.append((cells[0], cells[2]) if section == "## Findings" else cells[0])
    return structure
