"""Small real inputs shared by tests: a word-level tokenizer and tagged calibration files."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moescope.calibration import Prompt, load_calibration
from moescope.models.tiny import tiny_model

WORDS = "the cat sat on a mat dog ran far away one two three plus minus equals code def return print".split()
DOMAINS = ("prose", "math", "code")


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS, ids below 32 so it fits every tiny model's vocabulary."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def write_calibration(path, count: int = 9, start: int = 0) -> list[Prompt]:
    """`count` prompts over three domains and two languages, of varied lengths."""
    rows = [{"id": f"p{i}", "domain": DOMAINS[i % 3], "lang": ["en", "de"][i % 2],
             "text": " ".join(WORDS[j % len(WORDS)] for j in range(i, i + 2 + 3 * (i % 4)))}
            for i in range(start, start + count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_calibration(path)


def save_with_tokenizer(model, directory) -> None:
    """A checkpoint directory the CLI can load: weights, config and tokenizer."""
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)


def tiny_checkpoint(directory, model_type: str, dtype=None, **overrides):
    """A tiny random `model_type` saved with the word tokenizer (in `dtype` when given); returns the directory."""
    model = tiny_model(model_type, **overrides)
    save_with_tokenizer(model if dtype is None else model.to(dtype), directory)
    return directory
