"""The regression gate: compare a compressed model's answers with the original's, probe by probe.

Greedy-decodes the baseline and the candidate on every probe, runs the checks of `moescope.safety`
on each pair of answers, adds the KL of the candidate's next-token distributions along the
baseline's answer (teacher-forced), and writes a self-contained HTML page (failing pairs side by
side, evidence highlighted) and optionally JSON. `moescope gate` turns the verdict into its exit
status (0 pass, 1 did not pass, 2 could not run), so a CI job can stop a bad compression before
anyone ships it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moescope.backends.hf.loading import (
    Placement,
    check_same_tokenizer,
    eos_ids,
    input_device,
    load_tokenizer,
)
from moescope.backends.select import check_comparable, open_model
from moescope.calibration import PROBES, Prompt, load_calibration, records_by_id, render
from moescope.checkpoints import check_checkpoint_dir
from moescope.errors import MoescopeError
from moescope.judge.nll import token_kl, top1_matches
from moescope.judge.safety import DEFAULTS, VERDICTS, Thresholds, compare, language_method, overall, worst
from moescope.models.layout import prompt_room

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class GateOptions:
    max_new_tokens: int = 128
    batch_size: int = 8
    placement: Placement = field(default_factory=Placement)  # device and dtype of both models
    thresholds: Thresholds = DEFAULTS
    backend: str = "auto"  # of the candidate (backends.select: hf, mlx, or auto)
    baseline_backend: str = "auto"


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

def greedy_answers(model, prompts: list[list[int]], pad_id: int, eos: list[int], max_new_tokens: int,
                   batch_size: int) -> list[list[int]]:
    """Greedy continuations, batched with left padding, each cut after its first end-of-text token
    (which is kept, so the KL also sees where the baseline stopped)."""
    answers = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=input_device(model))
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=input_device(model))
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
    if not answer:
        return [], 1.0
    ids = prompt + answer
    span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
    with torch.no_grad():
        lb = base(input_ids=torch.tensor([ids], device=input_device(base))).logits[0, span].float().log_softmax(-1)
        lc = candidate(input_ids=torch.tensor([ids], device=input_device(candidate))).logits[0, span].float()
        lc = lc.log_softmax(-1).to(lb.device)
    if lb.shape != lc.shape:
        raise MoescopeError(f"the models' output vocabularies differ ({lb.shape[-1]} vs {lc.shape[-1]} logits)")
    kl = token_kl(lb, lc).clamp(min=0)  # exact KL is never negative; float rounding can be
    return kl.tolist(), top1_matches(lb, lc).float().mean().item()


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
    backends = {"baseline": options.baseline_backend, "candidate": options.backend}
    for side, directory in (("baseline", base_dir), ("candidate", candidate_dir)):
        log(f"gate: {side} {directory}: greedy answers to {len(probes)} probes")
        models[side] = open_model(directory, backends[side], options.placement)
        if side == "baseline":
            prompts, cut = fit_context(prompts, models[side].config, options.max_new_tokens)
            if cut:
                log(f"gate: kept the last tokens of {cut} prompts so that answers fit the model's context")
        if side == "candidate":
            check_comparable(models["baseline"], models[side])
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
