"""`moescope gate BASE_DIR CANDIDATE_DIR --probes probes.jsonl --out gate.html`: the regression gate.

Greedy-decodes the baseline and the candidate on every probe, runs the checks of `moescope.safety`
on each pair of answers, adds the KL of the candidate's next-token distributions along the
baseline's answer (teacher-forced), and writes a self-contained HTML page (failing pairs side by
side, evidence highlighted) and optionally JSON. The exit status is the verdict: 0 pass, 1 warn,
2 fail, so a CI job can stop a bad compression before anyone ships it.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.calibration import Prompt, load_calibration, records_by_id, render
from moescope.errors import MoescopeError
from moescope.loading import prompt_room
from moescope.output import write_atomic
from moescope.safety import DEFAULTS, VERDICTS, Thresholds, compare, language_method, overall, worst

PROBES = Path(__file__).resolve().parent / "assets" / "probes.jsonl"
EXIT = {"pass": 0, "warn": 1, "fail": 2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class GateOptions:
    max_new_tokens: int = 128
    batch_size: int = 8
    dtype: str | None = None  # None: the checkpoint's own dtype
    device: str | None = None  # a device_map such as "cuda" or "auto"; None: CPU
    thresholds: Thresholds = DEFAULTS


# --- input ---------------------------------------------------------------------------------------

def load_probes(path: str | Path) -> list[Prompt]:
    """Probes: the calibration format (validated there, with file:line) plus an optional `expect`
    object with `lang` (string), `script` (string) and `terms` (list of strings)."""
    prompts = load_calibration(path)
    lines = records_by_id(path)
    for p in prompts:
        where, expect = f"{path}:{lines[p.id][0]}", p.expect
        if expect is None:
            continue
        if not isinstance(expect, dict):
            raise MoescopeError(f"{where}: 'expect' must be an object such as {{\"lang\": \"es\", \"terms\": [...]}}")
        for key in ("lang", "script"):
            if key in expect and not (isinstance(expect[key], str) and expect[key]):
                raise MoescopeError(f"{where}: 'expect.{key}' must be a non-empty string")
        terms = expect.get("terms")
        if terms is not None and not (isinstance(terms, list) and all(isinstance(t, str) and t for t in terms)):
            raise MoescopeError(f"{where}: 'expect.terms' must be a list of non-empty strings")
    return prompts


# --- models --------------------------------------------------------------------------------------

def eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def greedy_answers(model, prompts: list[list[int]], pad_id: int, eos: list[int], max_new_tokens: int,
                   batch_size: int) -> list[list[int]]:
    """Greedy continuations, batched with left padding, each cut after its first end-of-text token
    (which is kept, so the KL also sees where the baseline stopped)."""
    import torch

    answers = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=eos or None)
        for row in out[:, width:].tolist():
            stop = next((j for j, t in enumerate(row) if t in eos), None)
            answers.append(row if stop is None else row[:stop + 1])
    return answers


def answer_kl(base, candidate, prompt: list[int], answer: list[int]) -> tuple[list[float], float]:
    """Per-token KL(baseline || candidate) of the next-token distributions that predict the
    baseline's answer tokens, teacher-forced on prompt + answer; and the top-1 agreement."""
    import torch

    if not answer:
        return [], 1.0
    ids = prompt + answer
    span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
    with torch.no_grad():
        lb = base(input_ids=torch.tensor([ids], device=base.device)).logits[0, span].float().log_softmax(-1)
        lc = candidate(input_ids=torch.tensor([ids], device=candidate.device)).logits[0, span].float()
        lc = lc.log_softmax(-1).to(lb.device)
    if lb.shape != lc.shape:
        raise MoescopeError(f"the models' output vocabularies differ ({lb.shape[-1]} vs {lc.shape[-1]} logits)")
    kl = (lb.exp() * (lb - lc)).sum(-1).clamp(min=0)
    return kl.tolist(), (lb.argmax(-1) == lc.argmax(-1)).float().mean().item()


def token_spans(tokenizer, answer: list[int], text: str) -> list[tuple[int, int]]:
    """Character span of each answer token in the decoded answer (approximate where a token is part
    of a multi-byte character)."""
    spans, start = [], 0
    for i in range(len(answer)):
        end = min(max(len(tokenizer.decode(answer[:i + 1], skip_special_tokens=True)), start), len(text))
        spans.append((start, end))
        start = end
    return spans


def fit_context(prompts: list[list[int]], config, max_new_tokens: int) -> tuple[list[list[int]], int]:
    """Prompts cut to their last tokens where prompt + answer would not fit the model's context
    (the end of a prompt is what the answer continues), and how many were cut."""
    keep = prompt_room(config, max_new_tokens, "--max-new-tokens")
    if keep is None:
        return prompts, 0
    return [p[-keep:] for p in prompts], sum(len(p) > keep for p in prompts)


def prompt_text(p: Prompt) -> str:
    return p.text if p.text is not None else "\n".join(m["content"] for m in p.messages or [])


def _count(verdicts: list[str]) -> dict[str, int]:
    return {v: verdicts.count(v) for v in VERDICTS}


def gate(base_dir: str | Path, candidate_dir: str | Path, probes_path: str | Path = PROBES,
         options: GateOptions | None = None, log=print) -> dict[str, Any]:
    """Compare a candidate with its baseline on a probe set; the report as a JSON-ready dict."""
    from moescope.loading import check_checkpoint_dir, check_same_tokenizer, load_model, load_tokenizer

    options = options or GateOptions()
    base_dir, candidate_dir = check_checkpoint_dir(base_dir), check_checkpoint_dir(candidate_dir)
    probes = load_probes(probes_path)
    tokenizers = []
    for directory in (base_dir, candidate_dir):
        try:
            if not any((directory / name).is_file() for name in TOKENIZER_FILES):
                raise OSError(f"none of {', '.join(TOKENIZER_FILES)}")
            tokenizers.append(load_tokenizer(directory))
        except (OSError, ValueError) as error:
            raise MoescopeError(f"{directory}: no usable tokenizer ({str(error).splitlines()[0]}); a compressed "
                                "checkpoint needs the baseline's tokenizer files beside its weights") from None
    tokenizer = tokenizers[0]
    check_same_tokenizer(base_dir, candidate_dir, *tokenizers)
    prompts = [render(p, tokenizer) for p in probes]
    for p, ids in zip(probes, prompts):
        if not ids:
            raise MoescopeError(f"probe {p.id!r} tokenises to nothing")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    models, answers = {}, {}
    for side, directory in (("baseline", base_dir), ("candidate", candidate_dir)):
        log(f"gate: {side} {directory}: greedy answers to {len(probes)} probes")
        models[side] = load_model(directory, dtype=options.dtype, device_map=options.device)
        if side == "baseline":
            prompts, cut = fit_context(prompts, models[side].config, options.max_new_tokens)
            if cut:
                log(f"gate: kept the last tokens of {cut} prompts so that answers fit the model's context")
        eos = eos_ids(models[side], tokenizer)
        answers[side] = greedy_answers(models[side], prompts, pad, eos, options.max_new_tokens, options.batch_size)
    th = options.thresholds
    rows = []
    for p, ids, base_ids, cand_ids in zip(probes, prompts, answers["baseline"], answers["candidate"]):
        base_text = tokenizer.decode(base_ids, skip_special_tokens=True)
        cand_text = tokenizer.decode(cand_ids, skip_special_tokens=True)
        kl, top1 = answer_kl(models["baseline"], models["candidate"], ids, base_ids)
        checks = compare(prompt_text(p), base_text, cand_text, p.expect, kl, top1,
                         token_spans(tokenizer, base_ids, base_text), th)
        rows.append({"id": p.id, "domain": p.domain, "lang": p.lang, "expect": p.expect,
                     "verdict": worst([c.verdict for c in checks]), "prompt": prompt_text(p),
                     "baseline": base_text, "candidate": cand_text, "checks": [dataclasses.asdict(c) for c in checks]})

    names = [c["name"] for c in rows[0]["checks"]] if rows else []
    groups = dict.fromkeys(f"{r['domain']}/{r['lang']}" for r in rows)
    return {"format_version": 1, "tool": "moescope gate", "baseline": str(base_dir), "candidate": str(candidate_dir),
            "probes": str(probes_path), "language_id": language_method(), "max_new_tokens": options.max_new_tokens,
            "thresholds": dataclasses.asdict(th), "verdict": overall([r["verdict"] for r in rows], th.fail_share),
            "prompts_by_verdict": _count([r["verdict"] for r in rows]),
            "checks": {n: _count([c["verdict"] for r in rows for c in r["checks"] if c["name"] == n]) for n in names},
            "domains": {g: _count([r["verdict"] for r in rows if f"{r['domain']}/{r['lang']}" == g]) for g in groups},
            "prompts": rows}


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


# --- CLI -----------------------------------------------------------------------------------------

def _threshold(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    known = {f.name for f in dataclasses.fields(Thresholds)}
    if name not in known or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(sorted(known))}")
    return name, float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE_DIR", help="the uncompressed model (checkpoint directory)")
    parser.add_argument("candidate", metavar="CANDIDATE_DIR", help="the compressed model to judge")
    parser.add_argument("--probes", default=str(PROBES), help="probe set, JSONL (default: the embedded probes)")
    parser.add_argument("--out", default="gate.html", help="HTML page to write (default: gate.html)")
    parser.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length cap (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="probes decoded together (default 8)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    parser.add_argument("--device", help="e.g. cpu, cuda, auto (default: cpu)")
    parser.add_argument("--threshold", type=_threshold, action="append", default=[], metavar="NAME=VALUE",
                        help="override a threshold, e.g. kl_fail=1.0 (repeatable; see docs/gate.md)")


def run(args: argparse.Namespace) -> int:
    defaults = dataclasses.asdict(DEFAULTS)
    th = Thresholds(**{**defaults, **{k: type(defaults[k])(v) for k, v in args.threshold}})
    options = GateOptions(args.max_new_tokens, args.batch_size, args.dtype, args.device, th)
    report = gate(args.base, args.candidate, args.probes, options, log=lambda m: print(m, file=sys.stderr))
    write_atomic(args.out, render_html(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    for name, counts in report["checks"].items():
        print(f"{name:<11} " + "  ".join(f"{v} {counts[v]:>3}" for v in VERDICTS))
    by = report["prompts_by_verdict"]
    print(f"verdict: {report['verdict']} ({by['fail']} failing, {by['warn']} warning, {by['pass']} passing probes); "
          f"wrote {args.out}")
    return EXIT[report["verdict"]]
