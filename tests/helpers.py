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


def tiny_checkpoint(directory, model_type: str, dtype=None, **overrides):
    """A tiny random `model_type` saved with the word tokenizer (in `dtype` when given); returns the directory."""
    model = tiny_model(model_type, **overrides)
    save_with_tokenizer(model if dtype is None else model.to(dtype), directory)
    return directory


def tree_hash(path) -> str:
    """A hash of every file name and byte under `path` (or of one file): equal before and after a run
    means the run changed nothing there."""
    import hashlib
    from pathlib import Path

    path, digest = Path(path), hashlib.sha256()
    for item in sorted([path, *path.rglob("*")] if path.is_dir() else [path]):
        digest.update(str(item.relative_to(path)).encode())
        if item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def listing(path) -> set[str]:
    """Every path under `path`, hidden ones included, relative to it."""
    from pathlib import Path

    return {str(p.relative_to(path)) for p in Path(path).rglob("*")}


def refused(capsys, *argv, after_work: bool = False) -> str:
    """Run the CLI in-process; assert it exited 2 with one error line and no traceback; return that line.
    Refusals before any work leave stderr at exactly that line; `after_work` allows progress bars before it."""
    from moescope.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and lines and lines[-1].startswith(f"moescope {argv[0]}"), err
    assert len(lines) == 1 or (after_work and sum(": error: " in line for line in lines) == 1), err
    return lines[-1]


def interrupt_profiling(monkeypatch, after_batches: int):
    """Make profiling runs raise KeyboardInterrupt (as Ctrl-C does) when batch `after_batches` + 1 starts;
    returns a function that lets them run whole again."""
    import moescope.profiling.run as profile_module

    real, calls = profile_module._run_batch, []

    def dying(*args):
        if len(calls) == after_batches:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(profile_module, "_run_batch", dying)
    return lambda: monkeypatch.setattr(profile_module, "_run_batch", real)


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
