"""Small real inputs shared by tests: a word-level tokenizer and tagged calibration files."""

from __future__ import annotations

import json

import torch
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


def successor_model(successors: dict[int, int], vocab_size: int, end_id: int, hidden_size: int = 128):
    """A real Qwen3-MoE whose greedy decoding follows `successors` (token id -> next id; any other id is
    followed by `end_id`): attention and expert outputs are zeroed, the embeddings are one-hot, and the
    LM head maps each token to its successor, so a test knows every answer in advance."""
    assert vocab_size <= hidden_size
    model = tiny_model("qwen3_moe", vocab_size=vocab_size, hidden_size=hidden_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj")):
                param.zero_()  # the residual stream keeps the token's own embedding
        model.model.embed_tokens.weight.copy_(torch.eye(vocab_size, hidden_size))
        head = torch.zeros(vocab_size, hidden_size)
        for token in range(vocab_size):
            head[successors.get(token, end_id), token] = 1.0
        model.lm_head.weight.copy_(head)
    return model
