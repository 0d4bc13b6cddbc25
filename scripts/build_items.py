"""Build moescope/assets/items.jsonl: labelled multiple-choice items for `moescope accuracy`.

    python scripts/build_items.py

The items come from the held-out reasoning tasks (`heldout/reasoning-en.jsonl`), which carry their
own answers: race puzzles ("Who finished first?", the choices are the runners named in the
puzzle) and syllogisms ("Must some farmers be birds?", yes / no). The worked reasoning is dropped,
so the question ends at "Answer:" and each choice is scored as the answer's continuation. Knight /
knave and number-sequence puzzles are left out (their answers are not a choice among a few words).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "moescope" / "assets"
NAME = re.compile(r"\b[A-Z][a-z]+\b")
QUESTION_WORDS = {"Puzzle", "Who", "Reasoning", "Answer", "Must", "Are", "All", "Some", "No"}


def item(number: int, text: str) -> dict | None:
    lines = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    puzzle, answer = lines.get("Puzzle"), lines.get("Answer", "").strip()
    if not puzzle or not answer:
        return None
    if answer in ("yes", "no"):
        choices = ["yes", "no"]
    elif "finished" in puzzle:
        choices = list(dict.fromkeys(n for n in NAME.findall(puzzle) if n not in QUESTION_WORDS))
    else:
        return None
    if answer not in choices or len(choices) < 2:
        return None
    return {"id": f"reasoning-{number:04d}", "domain": "reasoning", "lang": "en", "text": f"Puzzle: {puzzle}\nAnswer:",
            "choices": choices, "answer": choices.index(answer)}


def main() -> None:
    records = [json.loads(line) for line in open(ASSETS / "heldout" / "reasoning-en.jsonl", encoding="utf-8")]
    items = [x for x in (item(i, r["text"]) for i, r in enumerate(records) if "text" in r) if x]
    (ASSETS / "items.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    kinds = sum(x["choices"] == ["yes", "no"] for x in items)
    print(f"wrote {len(items)} items ({kinds} yes/no, {len(items) - kinds} races) to {ASSETS / 'items.jsonl'}")


if __name__ == "__main__":
    main()
