"""Accuracy per expert on labelled multiple-choice items (`moescope accuracy`).

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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moescope.analysis.accuracy import accuracy_table
from moescope.backends.hf.loading import input_device, model_identity
from moescope.backends.select import routing_capture
from moescope.calibration import Prompt, load_calibration, padded, records_by_id, render
from moescope.errors import MoescopeError


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


def score_item(model, tokenizer, item: Item, recorder) -> tuple[bool, dict[int, list[int]]]:
    """(right?, {layer: experts chosen at the answer position}) for one item: all its choices in one
    right-padded batch; causal attention makes the question's routing the same in every row."""
    context = render(item.prompt, tokenizer)
    if not context:
        raise MoescopeError(f"item {item.prompt.id!r}: the question tokenises to nothing")
    endings = [list(tokenizer(" " + choice, add_special_tokens=False)["input_ids"]) for choice in item.choices]
    ids, mask = padded([context + ending for ending in endings], pad_id=tokenizer.pad_token_id or 0)
    recorder.clear()
    with torch.no_grad():
        device = input_device(model)
        logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
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
    with routing_capture(model) as recorder:
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
    return {**accuracy_table(layers, total, correct, len(items), right), "model": model_identity(model).to_dict()}
