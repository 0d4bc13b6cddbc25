"""`moescope evaluate`: perplexity under a fixed protocol, and how far a candidate moved from its baseline.

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

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from moescope.errors import MoescopeError

HELDOUT_DIR = Path(__file__).resolve().parent / "assets" / "heldout"


@dataclass
class Protocol:
    seq_len: int = 2048
    sequences: int = 128
    seed: int = 42
    batch_size: int = 8
    dtype: str = "bfloat16"


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Protocol()
    parser.add_argument("--data", default=str(HELDOUT_DIR),
                        help="evaluation JSONL file or directory (default: the embedded held-out sets)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per window (clipped to context)")
    parser.add_argument("--sequences", type=int, default=defaults.sequences, help="windows per domain and language")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for choosing windows")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--dtype", default=defaults.dtype, help="bfloat16, float16 or float32")


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    return Protocol(args.seq_len, args.sequences, args.seed, args.batch_size, args.dtype)


def load_windows(data: str | Path, tokenizer, protocol: Protocol, model=None) -> dict[tuple[str, str], object]:
    """(domain, lang) -> LongTensor [windows, seq_len] under `protocol`."""
    import torch

    from moescope.calibration import load_calibration, token_stream

    data = Path(data)
    paths = sorted(data.glob("*.jsonl")) if data.is_dir() else [data]
    if not paths or not paths[0].exists():
        raise MoescopeError(f"{data}: no evaluation data (give a JSONL file or a directory of them)")
    groups: dict[tuple[str, str], list] = {}
    for path in paths:
        for prompt in load_calibration(path):
            groups.setdefault((prompt.domain, prompt.lang), []).append(prompt)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or protocol.seq_len
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


def window_nll(model, windows, batch_size: int = 8):
    """Summed next-token negative log-likelihood of each window [n] (float64)."""
    import torch

    device = next(model.parameters()).device
    sums = []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            sums.append(loss.double().sum(-1).cpu())
    return torch.cat(sums)


def perplexity(model, windows, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `windows` [n, seq_len]."""
    return math.exp(float(window_nll(model, windows, batch_size).sum()) / (windows.shape[0] * (windows.shape[1] - 1)))


def group_perplexities(model, windows: dict, batch_size: int = 8) -> dict[tuple[str, str], float]:
    return {group: perplexity(model, rows, batch_size) for group, rows in windows.items()}


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def expert_id_map(candidate_dir: str | Path | None):
    """For a checkpoint written by `moescope prune --method remove`: layer -> original id of each new id."""
    import torch

    from moescope.checkpoint import read_metadata

    if candidate_dir is None:
        return {}
    meta = read_metadata(candidate_dir)
    if meta.get("method") != "remove":
        return {}
    from moescope.prune import PrunePlan

    plan = PrunePlan.from_json(meta["plan"])
    return {layer: torch.tensor(plan.kept(layer)) for layer in plan.num_experts}


def compare(baseline, candidate, windows: dict, batch_size: int = 8, id_map: dict | None = None) -> dict:
    """KL(baseline || candidate), top-1 agreement per group, and routing drift per MoE layer."""
    import torch

    from moescope.capture import capture_routing

    id_map = id_map or {}
    results, changed, seen = {}, {}, {}

    def drift(base_events, cand_events) -> None:
        for b, c in zip(base_events, cand_events):
            cand_ids = id_map[c.layer][c.expert_ids] if c.layer in id_map else c.expert_ids
            moved = (b.expert_ids.sort(-1).values != cand_ids.sort(-1).values).any(-1)
            changed[b.layer] = changed.get(b.layer, 0) + int(moved.sum())
            seen[b.layer] = seen.get(b.layer, 0) + moved.numel()

    with torch.no_grad():
        for group, rows in windows.items():
            kl_sum, agree, tokens = 0.0, 0, 0
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                with capture_routing(baseline) as base_rec:
                    base_logp = baseline(input_ids=batch).logits[:, :-1].float().log_softmax(-1)
                with capture_routing(candidate) as cand_rec:
                    cand_logp = candidate(input_ids=batch).logits[:, :-1].float().log_softmax(-1)
                kl_sum += float((base_logp.exp() * (base_logp - cand_logp)).sum())
                agree += int((base_logp.argmax(-1) == cand_logp.argmax(-1)).sum())
                tokens += base_logp.shape[0] * base_logp.shape[1]
                drift(base_rec.events, cand_rec.events)
            results[group] = {"kl": kl_sum / tokens, "top1_agreement": agree / tokens}
    return {"groups": results, "routing_drift": {layer: changed[layer] / seen[layer] for layer in sorted(changed)}}


def evaluate(model_dir: str, protocol: Protocol, data: str, baseline_dir: str | None = None) -> dict:
    """Perplexity per (domain, lang), and the comparison with a baseline when one is given."""
    from moescope.loading import check_same_tokenizer, load_model, load_tokenizer

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
        drift = compare(baseline, model, windows, protocol.batch_size, expert_id_map(model_dir))
        for (d, g), p in base_ppl.items():
            report["groups"][f"{d}/{g}"].update(baseline_perplexity=p, ratio=perplexities[(d, g)] / p,
                                                **drift["groups"][(d, g)])
        report["baseline"] = str(baseline_dir)
        report["baseline_perplexity_geomean"] = geometric_mean(base_ppl.values())
        report["routing_drift"] = {str(k): v for k, v in drift["routing_drift"].items()}
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint to evaluate")
    parser.add_argument("--baseline", metavar="BASE_DIR", help="compare with this (uncompressed) checkpoint")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_protocol_arguments(parser)


def run(args: argparse.Namespace) -> int:
    report = evaluate(args.model_dir, protocol_from_args(args), args.data, args.baseline)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    compared = "baseline" in report
    table = Table(title=f"{args.model_dir}: perplexity, {report['seq_len']}-token windows")
    columns = ["domain/lang", "windows", "perplexity"] + (["baseline", "ratio", "KL", "top-1"] if compared else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "domain/lang" else "right")
    for group, row in report["groups"].items():
        cells = [group, str(row["windows"]), f"{row['perplexity']:.3f}"]
        if compared:
            cells += [f"{row['baseline_perplexity']:.3f}", f"{row['ratio']:.3f}", f"{row['kl']:.4f}",
                      f"{row['top1_agreement']:.1%}"]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    line = f"geometric mean perplexity {report['perplexity_geomean']:.3f}"
    if compared:
        line += f" (baseline {report['baseline_perplexity_geomean']:.3f}); routing drift per layer: " + ", ".join(
            f"{layer}: {share:.1%}" for layer, share in report["routing_drift"].items())
    console.print(line)
    return 0
