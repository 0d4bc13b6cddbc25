"""Perplexity under a fixed protocol, and how far a candidate moved from its baseline.

Protocol (the seeds' numbers by default): the text of each (domain, language) is tokenised record by
record (chats through the chat template), joined with the end-of-text token, and cut into
non-overlapping windows of `seq_len` tokens (2048, clipped to the model's context); when there are
more than `sequences` windows (128), that many are drawn with `seed` (42). Each window is scored on
its own, so its first token is never predicted. Models run at bf16 on the CPU unless the protocol's
placement says otherwise (`--dtype`, `--device`, `--max-memory`), each under its own backend
(transformers or mlx-lm, backends.select): the same windows and the same arithmetic compare, say, a
bf16 checkpoint with a 3.5-bit MLX model.

Against a baseline, on the same windows: the mean KL divergence KL(baseline || candidate) of the
next-token distributions, top-1 agreement, and routing drift: per MoE layer, the share of tokens
whose set of chosen experts changed (a removed checkpoint's expert ids are mapped back to the
original ones through the plan recorded in its metadata; for a merged checkpoint the baseline's
ids are mapped to the merged expert they were folded into, so a token whose two chosen experts were
merged into one counts as moved: its freed slot went to another expert).

Data: a JSONL file or a directory of them, in the calibration format (`moescope/assets/heldout/`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moescope.backends.hf.loading import (
    Placement,
    check_same_tokenizer,
    input_device,
    load_tokenizer,
    model_identity,
)
from moescope.backends.select import check_comparable, open_model, routing_capture
from moescope.calibration import load_calibration, token_stream
from moescope.checkpoints import read_metadata
from moescope.compress.prune import count_route_changes, kept_ids
from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity
from moescope.judge.nll import geometric_mean, nll_perplexity, token_kl, top1_matches, window_nll
from moescope.models.layout import context_length
from moescope.plans import MergePlan, PrunePlan


@dataclass
class Protocol:
    seq_len: int = 2048
    sequences: int = 128
    seed: int = 42
    batch_size: int = 8
    placement: Placement = field(default_factory=lambda: Placement(dtype="bfloat16"))
    backend: str = "auto"  # of the model evaluated (backends.select)
    baseline_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.sequences < 1 or self.batch_size < 1:
            raise MoescopeError(f"the protocol needs --seq-len >= 2 (a window predicts all but its first token), "
                                f"--sequences >= 1 and --batch-size >= 1, not {self.seq_len}, {self.sequences} and "
                                f"{self.batch_size}")


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
    return {group: nll_perplexity(sums, windows[group]) for group, sums in nll.items()}


def expert_id_map(candidate_dir: str | Path | None, baseline: ModelIdentity | None = None):
    """For a checkpoint written by `moescope prune --method remove`: layer -> original id of each new id,
    after checking that the plan it records was made for `baseline` (when given)."""
    if candidate_dir is None:
        return {}
    meta = read_metadata(candidate_dir)
    if meta.get("method") != "remove":
        return {}
    plan = PrunePlan.from_json(meta.get("plan"), f"the prune plan recorded in {candidate_dir}")
    if baseline is not None:
        plan.model.require(baseline, f"prune plan recorded in {candidate_dir}")
    return kept_ids(plan)


def baseline_id_map(candidate_dir: str | Path | None):
    """For a checkpoint written by `moescope prune --method merge`: layer -> merged id of each original id."""
    meta = read_metadata(candidate_dir) if candidate_dir is not None else {}
    if meta.get("method") != "merge":
        return {}
    plan = MergePlan.from_json(meta.get("plan"), f"the merge plan recorded in {candidate_dir}")
    return {layer: torch.tensor(plan.targets(layer)) for layer in plan.num_experts}


def compare_models(baseline, candidate, windows: dict, batch_size: int = 8, id_map: dict | None = None,
                   baseline_map: dict | None = None) -> dict:
    """KL(baseline || candidate), top-1 agreement per group, and routing drift per MoE layer (`id_map`:
    candidate ids to baseline ids; `baseline_map`: baseline ids to candidate ids)."""
    results, changed, seen = {}, {}, {}
    with torch.no_grad():
        for group, rows in windows.items():
            kl_sum, agree, tokens = 0.0, 0, 0
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                with routing_capture(baseline) as base_rec:
                    base_logp = baseline(input_ids=batch.to(input_device(baseline))).logits[:, :-1].float()
                    base_logp = base_logp.log_softmax(-1)
                with routing_capture(candidate) as cand_rec:
                    cand_logp = candidate(input_ids=batch.to(input_device(candidate))).logits[:, :-1].float()
                    cand_logp = cand_logp.log_softmax(-1).to(base_logp.device)
                kl_sum += float(token_kl(base_logp, cand_logp).sum())
                agree += int(top1_matches(base_logp, cand_logp).sum())
                tokens += base_logp.shape[0] * base_logp.shape[1]
                count_route_changes(base_rec.events, cand_rec.events, id_map or {}, changed, seen, baseline_map)
            results[group] = {"kl": kl_sum / tokens, "top1_agreement": agree / tokens}
    return {"groups": results, "routing_drift": {layer: changed[layer] / seen[layer] for layer in sorted(changed)}}


def evaluate(model_dir: str, protocol: Protocol, data: str, baseline_dir: str | None = None) -> dict:
    """Perplexity per (domain, lang), and the comparison with a baseline when one is given."""
    model, tokenizer = open_model(model_dir, protocol.backend, protocol.placement), load_tokenizer(model_dir)
    windows = load_windows(data, tokenizer, protocol, model)
    perplexities = group_perplexities(model, windows, protocol.batch_size)
    report = {"model": str(model_dir), "protocol": asdict(protocol), "data": str(data),
              "seq_len": next(iter(windows.values())).shape[1],
              "groups": {f"{d}/{g}": {"windows": len(windows[(d, g)]), "perplexity": p}
                         for (d, g), p in perplexities.items()},
              "perplexity_geomean": geometric_mean(perplexities.values())}
    if baseline_dir:
        check_same_tokenizer(Path(baseline_dir), Path(model_dir), load_tokenizer(baseline_dir), tokenizer)
        baseline = open_model(baseline_dir, protocol.baseline_backend, protocol.placement)
        check_comparable(baseline, model)
        base_ppl = group_perplexities(baseline, windows, protocol.batch_size)
        id_map = expert_id_map(model_dir, model_identity(baseline))
        drift = compare_models(baseline, model, windows, protocol.batch_size, id_map, baseline_id_map(model_dir))
        for (d, g), p in base_ppl.items():
            report["groups"][f"{d}/{g}"].update(baseline_perplexity=p, ratio=perplexities[(d, g)] / p,
                                                **drift["groups"][(d, g)])
        report["baseline"] = str(baseline_dir)
        report["baseline_perplexity_geomean"] = geometric_mean(base_ppl.values())
        report["routing_drift"] = {str(k): v for k, v in drift["routing_drift"].items()}
    return report
