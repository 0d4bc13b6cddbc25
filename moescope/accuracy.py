"""`moescope accuracy MODEL_DIR --items items.jsonl --out acc.json`: accuracy per expert.

OLMoE's authors found that experts differ in how often the model is right when they are chosen
(80 % for one, 34 % for another). This measures that on labelled multiple-choice items: each item
is scored by the log-likelihood of every choice after the question (the choice with the highest
total log-probability is the answer), and the routing is read at the answer position, the last
question token, whose output predicts the answer's first token. For every layer and expert: how
many items routed there, how many of those were right, and a Wilson 95 % interval, so an expert
seen on five items is not mistaken for a bad one.

Items are the calibration format (`id`, `domain`, `lang`, `text` or `messages` for the question)
plus `choices` (two or more non-empty strings) and `answer` (the index of the right choice). A
choice is scored as the tokens of " " + choice after the question's tokens.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.calibration import Prompt, load_calibration, records_by_id, render
from moescope.errors import MoescopeError
from moescope.output import read_json, write_atomic

FORMAT_VERSION = 1
FEW_ITEMS = 10  # experts routed fewer items than this are flagged as too few to judge


@dataclass
class Item:
    prompt: Prompt
    choices: list[str]
    answer: int


def load_items(path: str | Path) -> list[Item]:
    """Labelled multiple-choice items; MoescopeError with file:line on anything malformed."""
    prompts = load_calibration(path)
    records = records_by_id(path)
    items = []
    for prompt in prompts:
        line, record = records[prompt.id]
        where = f"{path}:{line}"
        choices, answer = record.get("choices"), record.get("answer")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip()
                                                                        for c in choices)):
            raise MoescopeError(f"{where}: 'choices' must be a list of two or more non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise MoescopeError(f"{where}: 'answer' must be the index of the right choice, 0 to {len(choices) - 1}")
        items.append(Item(prompt, choices, answer))
    return items


def wilson(correct: np.ndarray, total: np.ndarray, z: float = 1.96) -> np.ndarray:
    """[2, ...] Wilson score interval of a proportion (NaN where total is 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = correct / total
        centre = (p + z * z / (2 * total)) / (1 + z * z / total)
        half = z / (1 + z * z / total) * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return np.stack([centre - half, centre + half])


def score_item(model, tokenizer, item: Item, recorder) -> tuple[bool, dict[int, list[int]]]:
    """(right?, {layer: experts chosen at the answer position}) for one item: all its choices in one
    right-padded batch; causal attention makes the question's routing the same in every row."""
    import torch

    from moescope.calibration import padded

    context = render(item.prompt, tokenizer)
    if not context:
        raise MoescopeError(f"item {item.prompt.id!r}: the question tokenises to nothing")
    endings = [list(tokenizer(" " + choice, add_special_tokens=False)["input_ids"]) for choice in item.choices]
    ids, mask = padded([context + ending for ending in endings], pad_id=tokenizer.pad_token_id or 0)
    recorder.clear()
    with torch.no_grad():
        logprobs = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
    logprobs = logprobs.log_softmax(-1).cpu()
    scores = [sum(float(logprobs[row, len(context) + i - 1, token]) for i, token in enumerate(ending))
              for row, ending in enumerate(endings)]
    routed = {}
    for event in recorder.events:
        at = (event.rows == 0) & (event.positions == len(context) - 1)
        routed[event.layer] = event.expert_ids[at][0].tolist()
    return int(np.argmax(scores)) == item.answer, routed


def expert_accuracy(model, tokenizer, items: list[Item], progress: bool = True) -> dict:
    """Accuracy per layer and expert over `items` (the JSON written by the verb)."""
    from tqdm import tqdm

    from moescope.capture import capture_routing

    with capture_routing(model) as recorder:
        layers = {layer.index: layer.num_experts for layer in recorder.layers}
        total = {index: np.zeros(e, np.int64) for index, e in layers.items()}
        correct = {index: np.zeros(e, np.int64) for index, e in layers.items()}
        right = 0
        for item in tqdm(items, unit="item", disable=not progress):
            ok, routed = score_item(model, tokenizer, item, recorder)
            right += ok
            for index, experts in routed.items():
                total[index][experts] += 1
                correct[index][experts] += ok
    out_layers = []
    for index in layers:
        low, high = wilson(correct[index], total[index])
        out_layers.append({"layer": index, "experts": [
            {"expert": e, "items": int(n), "correct": int(c), "accuracy": round(c / n, 4) if n else None,
             "ci": [round(float(low[e]), 4), round(float(high[e]), 4)] if n else None, "few": bool(n < FEW_ITEMS)}
            for e, (n, c) in enumerate(zip(total[index], correct[index]))]})
    return {"format_version": FORMAT_VERSION, "kind": "expert_accuracy", "items": len(items), "correct": right,
            "accuracy": round(right / len(items), 4), "few_items": FEW_ITEMS, "layers": out_layers}


def load_accuracy(path: str | Path) -> dict:
    """A file written by `moescope accuracy`; MoescopeError if it is not one."""
    data = read_json(path, "accuracy file")
    if not isinstance(data, dict) or data.get("kind") != "expert_accuracy":
        raise MoescopeError(f"{path} is not a `moescope accuracy` file")
    return data


def summary_lines(result: dict) -> list[str]:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="local checkpoint")
    parser.add_argument("--items", required=True, metavar="JSONL",
                        help="labelled multiple-choice items: calibration fields + choices + answer")
    parser.add_argument("--out", required=True, help="JSON to write (give it to `moescope report --accuracy`)")
    parser.add_argument("--dtype", help="e.g. bfloat16, float32 (default: the checkpoint's)")
    parser.add_argument("--device", help="e.g. cpu, cuda, auto (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from moescope.loading import load_model, load_tokenizer

    items = load_items(args.items)
    model = load_model(args.model, dtype=args.dtype, device_map=args.device)
    result = expert_accuracy(model, load_tokenizer(args.model), items)
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    for line in summary_lines(result):
        print(line)
    print(f"wrote {args.out}")
    return 0

