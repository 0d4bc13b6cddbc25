"""Accuracy per expert, with Wilson intervals: the file `moescope accuracy` writes and the report reads.

OLMoE's authors found that experts differ in how often the model is right when they are chosen. The
counts come from judge.accuracy (which scores the items with the model); here they become
accuracies with Wilson 95 % intervals, so an expert seen on five items is not mistaken for a bad one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity
from moescope.output import read_json
from moescope.schema import Count, Maybe, Number, check

FORMAT_VERSION = 1
FEW_ITEMS = 10  # experts routed fewer items than this are flagged as too few to judge
EXPERT_SHAPE = {"expert": Count(0), "items": Count(0), "correct": Count(0), "accuracy": Maybe(Number(0)),
                "ci": Maybe([Number()]), "few": bool}
SHAPE = {"items": Count(1), "correct": Count(0), "accuracy": Number(0), "few_items": Count(0),
         "layers": [{"layer": Count(0), "experts": [EXPERT_SHAPE]}]}


def wilson(correct: np.ndarray, total: np.ndarray, z: float = 1.96) -> np.ndarray:
    """[2, ...] Wilson score interval of a proportion (NaN where total is 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = correct / total
        centre = (p + z * z / (2 * total)) / (1 + z * z / total)
        half = z / (1 + z * z / total) * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return np.stack([centre - half, centre + half])


def accuracy_table(layers: dict[int, int], total: dict[int, np.ndarray], correct: dict[int, np.ndarray], items: int,
                   right: int) -> dict:
    """The accuracy file's JSON from items routed to and right per layer and expert (`total`, `correct`)."""
    out_layers = []
    for index in layers:
        low, high = wilson(correct[index], total[index])
        out_layers.append({"layer": index, "experts": [
            {"expert": e, "items": int(n), "correct": int(c), "accuracy": round(c / n, 4) if n else None,
             "ci": [round(float(low[e]), 4), round(float(high[e]), 4)] if n else None, "few": bool(n < FEW_ITEMS)}
            for e, (n, c) in enumerate(zip(total[index], correct[index]))]})
    return {"format_version": FORMAT_VERSION, "kind": "expert_accuracy", "items": items, "correct": right,
            "accuracy": round(right / items, 4), "few_items": FEW_ITEMS, "layers": out_layers}




def load_accuracy(path: str | Path, model: ModelIdentity | None = None) -> dict:
    """A file written by `moescope accuracy` (for `model`, when given); MoescopeError if it is not one."""
    data = read_json(path, "accuracy file")
    if not isinstance(data, dict) or data.get("kind") != "expert_accuracy":
        raise MoescopeError(f"{path} is not a `moescope accuracy` file")
    check(data, SHAPE, str(path), "write it again with `moescope accuracy`")
    for layer in data["layers"]:
        for expert in layer["experts"]:
            seen, ci = expert["items"] > 0, expert.get("ci")
            if seen != (expert.get("accuracy") is not None) or seen != (ci is not None and len(ci) == 2) or not (
                    seen or expert["few"]):
                raise MoescopeError(f"{path}: layer {layer['layer']} expert {expert['expert']}: accuracy and ci must "
                                    "be given exactly when items > 0 (and an expert without items is few); write it "
                                    "again with `moescope accuracy`")
    if model is not None:
        ModelIdentity.from_dict(data.get("model"), str(path)).require(model, f"accuracy file {path}")
    return data


def accuracy_lines(result: dict) -> list[str]:
    lines = [f"{result['correct']} of {result['items']} items right ({result['accuracy']:.1%})"]
    for layer in result["layers"]:
        judged = [x for x in layer["experts"] if not x["few"]]
        if len(judged) < 2:
            lines.append(f"layer {layer['layer']}: fewer than two experts have {result['few_items']}+ items")
            continue
        best, worst = max(judged, key=lambda x: x["accuracy"]), min(judged, key=lambda x: x["accuracy"])
        if best["accuracy"] == worst["accuracy"]:
            lines.append(f"layer {layer['layer']}: all {len(judged)} experts with {result['few_items']}+ items at "
                         f"{best['accuracy']:.0%}")
            continue
        lines.append(f"layer {layer['layer']}: expert {best['expert']} {best['accuracy']:.0%} of {best['items']} "
                     f"items, expert {worst['expert']} {worst['accuracy']:.0%} of {worst['items']} "
                     f"({len(judged)} experts with {result['few_items']}+ items)")
    return lines
