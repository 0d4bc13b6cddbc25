"""Perplexity under a fixed protocol, and how far a candidate moved from its baseline.

Protocol (the seeds' numbers by default): the text of each (domain, language) is tokenised record by
record (chats through the chat template), joined with the end-of-text token, and cut into
non-overlapping windows of `seq_len` tokens (2048, clipped to the model's context); when there are
more than `sequences` windows (128), that many are drawn with `seed` (42). Each window is scored on
its own, so its first token is never predicted. Models run at bf16 unless told otherwise.

Against a baseline, on the same windows: the mean KL divergence KL(baseline || candidate) of the
next-token distributions, top-1 agreement, and routing drift: per MoE layer, the share of tokens
whose set of chosen experts changed (a removed checkpoint's expert ids are mapped back to the
original ones through the plan recorded in its metadata).

Data: a JSONL file or a directory of them, in the calibration format (`moescope/assets/heldout/`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moescope.backends.hf.capture import capture_routing
from moescope.backends.hf.loading import check_same_tokenizer, load_model, load_tokenizer
from moescope.calibration import load_calibration, token_stream
from moescope.checkpoints import read_metadata
from moescope.compress.prune import count_route_changes, kept_ids
from moescope.errors import MoescopeError
from moescope.judge.nll import geometric_mean, perplexity_from_nll, token_kl, top1_matches, window_nll
from moescope.models.layout import context_length
from moescope.plans import PrunePlan


@dataclass
class Protocol:
    seq_len: int = 2048
    sequences: int = 128
    seed: int = 42
    batch_size: int = 8
    dtype: str = "bfloat16"


def load_windows(data: str | Path, tokenizer, protocol: Protocol, model=None) -> dict[tuple[str, str], object]:
    """(domain, lang) -> LongTensor [windows, seq_len] under `protocol`."""
    data = Path(data)
    paths = sorted(data.glob("*.jsonl")) if data.is_dir() else [data]
    if not paths or not paths[0].exists():
        raise MoescopeError(f"{data}: no evaluation data (give a JSONL file or a directory of them)")
    groups: dict[tuple[str, str], list] = {}
    for path in paths:
        for prompt in load_calibration(path):
            groups.setdefault((prompt.domain, prompt.lang), []).append(prompt)
    context = (context_length(model.config) if model is not None else None) or protocol.seq_len
    seq_len = min(protocol.seq_len, context)
    windows = {}
    for (domain, lang), prompts in sorted(groups.items()):
        stream = token_stream(prompts, tokenizer)
        count = len(stream) // seq_len
        if count == 0:
            raise MoescopeError(f"{domain}/{lang} has {len(stream)} tokens, fewer than one sequence of {seq_len}: "
                                f"add at least {seq_len - len(stream)} tokens of text or lower --seq-len")
        rows = torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
        if count > protocol.sequences:
            chosen = torch.randperm(count, generator=torch.Generator().manual_seed(protocol.seed))
            rows = rows[chosen[: protocol.sequences].sort().values]
        windows[(domain, lang)] = rows
    return windows


def group_perplexities(model, windows: dict, batch_size: int = 8,
                       per_window: dict | None = None) -> dict[tuple[str, str], float]:
    """(domain, lang) -> perplexity; `per_window`, when given, also receives (domain, lang) -> each window's
    mean NLL per predicted token [windows] (for intervals over the windows)."""
    nll = {group: window_nll(model, rows, batch_size) for group, rows in windows.items()}
    if per_window is not None:
        per_window.update({group: sums / (windows[group].shape[1] - 1) for group, sums in nll.items()})
    return {group: perplexity_from_nll(sums, windows[group].shape) for group, sums in nll.items()}


def expert_id_map(candidate_dir: str | Path | None):
    """For a checkpoint written by `moescope prune --method remove`: layer -> original id of each new id."""
    if candidate_dir is None:
        return {}
    meta = read_metadata(candidate_dir)
    if meta.get("method") != "remove":
        return {}
    return kept_ids(PrunePlan.from_json(meta["plan"]))


def compare_models(baseline, candidate, windows: dict, batch_size: int = 8, id_map: dict | None = None) -> dict:
    """KL(baseline || candidate), top-1 agreement per group, and routing drift per MoE layer."""
    results, changed, seen = {}, {}, {}
    with torch.no_grad():
        for group, rows in windows.items():
            kl_sum, agree, tokens = 0.0, 0, 0
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                with capture_routing(baseline) as base_rec:
                    base_logp = baseline(input_ids=batch).logits[:, :-1].float().log_softmax(-1)
                with capture_routing(candidate) as cand_rec:
                    cand_logp = candidate(input_ids=batch).logits[:, :-1].float().log_softmax(-1)
                kl_sum += float(token_kl(base_logp, cand_logp).sum())
                agree += int(top1_matches(base_logp, cand_logp).sum())
                tokens += base_logp.shape[0] * base_logp.shape[1]
                count_route_changes(base_rec.events, cand_rec.events, id_map or {}, changed, seen)
            results[group] = {"kl": kl_sum / tokens, "top1_agreement": agree / tokens}
    return {"groups": results, "routing_drift": {layer: changed[layer] / seen[layer] for layer in sorted(changed)}}


def evaluate(model_dir: str, protocol: Protocol, data: str, baseline_dir: str | None = None) -> dict:
    """Perplexity per (domain, lang), and the comparison with a baseline when one is given."""
    model, tokenizer = load_model(model_dir, dtype=protocol.dtype), load_tokenizer(model_dir)
    windows = load_windows(data, tokenizer, protocol, model)
    perplexities = group_perplexities(model, windows, protocol.batch_size)
    report = {"model": str(model_dir), "protocol": asdict(protocol), "data": str(data),
              "seq_len": next(iter(windows.values())).shape[1],
              "groups": {f"{d}/{g}": {"windows": len(windows[(d, g)]), "perplexity": p}
                         for (d, g), p in perplexities.items()},
              "perplexity_geomean": geometric_mean(perplexities.values())}
    if baseline_dir:
        check_same_tokenizer(Path(baseline_dir), Path(model_dir), load_tokenizer(baseline_dir), tokenizer)
        baseline = load_model(baseline_dir, dtype=protocol.dtype)
        base_ppl = group_perplexities(baseline, windows, protocol.batch_size)
        drift = compare_models(baseline, model, windows, protocol.batch_size, expert_id_map(model_dir))
        for (d, g), p in base_ppl.items():
            report["groups"][f"{d}/{g}"].update(baseline_perplexity=p, ratio=perplexities[(d, g)] / p,
                                                **drift["groups"][(d, g)])
        report["baseline"] = str(baseline_dir)
        report["baseline_perplexity_geomean"] = geometric_mean(base_ppl.values())
        report["routing_drift"] = {str(k): v for k, v in drift["routing_drift"].items()}
    return report
