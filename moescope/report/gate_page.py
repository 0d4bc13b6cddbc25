"""The gate's page: verdict, per-check counts, and every pair that did not pass side by side, with the
evidence highlighted. Self-contained HTML: no scripts, no network."""

from __future__ import annotations

import html
from typing import Any

from moescope.judge.safety import VERDICTS

# --- output --------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
h1{font-size:1.4em} table{border-collapse:collapse} td,th{padding:.3em .6em;border:1px solid #ccc;vertical-align:top}
.pass{color:#17692e}.warn{color:#8a5a00}.fail{color:#b00020} .badge{font-weight:600;text-transform:uppercase}
.pair{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1em}
.pair pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:.6em;margin:.2em 0;border-radius:4px}
pre{white-space:pre-wrap;word-break:break-word} .prompt{color:#555}
mark{background:#ffd6d6;border-bottom:2px solid #b00020} section{border-top:1px solid #ddd;padding:.8em 0}
"""


def highlight(text: str, spans: list[tuple[int, int, str]]) -> str:
    """HTML of `text` with the character spans marked (title = why); everything escaped."""
    cuts = sorted({0, len(text), *(max(0, min(p, len(text))) for s, e, _ in spans for p in (s, e))})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        notes = [n for s, e, n in spans if s <= a and b <= e]
        piece = html.escape(text[a:b])
        out.append(f'<mark title="{html.escape("; ".join(dict.fromkeys(notes)))}">{piece}</mark>' if notes else piece)
    return "".join(out)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: verdict, per-check counts, thresholds, then every pair that did not pass
    side by side (failures first) with its evidence highlighted. No scripts, no network."""
    e = html.escape
    head = (f"<h1>moescope gate: <span class='badge {report['verdict']}'>{report['verdict']}</span></h1>"
            f"<p>baseline <code>{e(report['baseline'])}</code> vs candidate <code>{e(report['candidate'])}</code>, "
            f"{len(report['prompts'])} probes from <code>{e(report['probes'])}</code>, greedy, "
            f"{report['max_new_tokens']} new tokens at most; language id: {e(report['language_id'])}.</p>")
    tables = []
    for title, key in (("check", "checks"), ("probes of domain/language", "domains")):
        rows = "".join(f"<tr><td>{e(n)}</td>" + "".join(f"<td class='{v}'>{c[v]}</td>" for v in VERDICTS) + "</tr>"
                       for n, c in report[key].items())
        tables.append(f"<table><tr><th>{title}</th>{''.join(f'<th>{v}</th>' for v in VERDICTS)}</tr>{rows}</table>")
    table = "<div class='pair'>" + "".join(f"<div>{t}</div>" for t in tables) + "</div>"
    sections = []
    for row in sorted(report["prompts"], key=lambda r: -VERDICTS.index(r["verdict"])):  # failures first
        if row["verdict"] == "pass":
            continue
        marks: dict[str, list[tuple[int, int, str]]] = {"baseline": [], "candidate": []}
        for check in row["checks"]:
            for ev in check["evidence"]:
                marks[ev["side"]].append((ev["start"], ev["end"], f"{check['name']}: {ev['note']}"))
        reasons = "".join(f"<li><span class='badge {c['verdict']}'>{c['verdict']}</span> <b>{e(c['name'])}</b>: "
                          f"{e(c['reason'])}</li>" for c in row["checks"] if c["verdict"] != "pass")
        sections.append(
            f"<section><h3><span class='badge {row['verdict']}'>{row['verdict']}</span> {e(row['id'])} "
            f"<small>({e(row['domain'])}, {e(row['lang'])})</small></h3><ul>{reasons}</ul>"
            f"<pre class='prompt'>{e(row['prompt'][-600:])}</pre><div class='pair'>"
            f"<div><b>baseline</b><pre>{highlight(row['baseline'], marks['baseline'])}</pre></div>"
            f"<div><b>candidate</b><pre>{highlight(row['candidate'], marks['candidate'])}</pre></div></div></section>")
    passed = [e(r["id"]) for r in report["prompts"] if r["verdict"] == "pass"]
    thresholds = ", ".join(f"{e(k)}={v}" for k, v in report["thresholds"].items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>moescope gate: {report['verdict']}</title>"
            f"<style>{CSS}</style></head><body>{head}{table}{''.join(sections) or '<p>Every probe passed.</p>'}"
            f"<details><summary>{len(passed)} probes passed</summary><p>{', '.join(passed)}</p></details>"
            f"<p><small>thresholds: {thresholds}</small></p></body></html>\n")
