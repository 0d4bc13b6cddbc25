"""Calibration sets: validation names file:line, domain selection, chat rendering, token caps, hashing."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moescope.calibration import batches, encode, load_calibration, render, set_hash
from moescope.errors import MoescopeError

WORDS = "hello world user assistant : the cat sat".split()


def tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "<|im|>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    out.chat_template = chat_template
    return out


def write(tmp_path, *lines: str):
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def row(**fields) -> str:
    return json.dumps({"id": "a", "domain": "prose", "lang": "en", "text": "hello world", **fields})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "b", "domain": ', "cal.jsonl:3: invalid JSON"),
        ('["not", "an", "object"]', "cal.jsonl:3: expected a JSON object"),
        (json.dumps({"id": "b", "lang": "en", "text": "x"}), "cal.jsonl:3: missing field 'domain'"),
        (row(id="b", text="   "), "cal.jsonl:3: 'text' is empty"),
        (row(id="b", messages=[{"role": "user", "content": "hi"}]), "cal.jsonl:3: give exactly one of"),
        (row(id="b", lang="english language"), "cal.jsonl:3: 'lang' 'english language' is not a BCP-47"),
        (row(id="a"), "cal.jsonl:3: duplicate id 'a' \\(first on line 1\\)"),
    ],
)
def test_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, row(), "", line)  # line 2 is blank, which is allowed
    with pytest.raises(MoescopeError, match=message):
        load_calibration(path)


def test_domains_are_selected_and_unknown_ones_refused(tmp_path):
    path = write(tmp_path, row(), row(id="b", domain="math"), row(id="c", domain="code", lang="zh-Hans"))
    assert [p.id for p in load_calibration(path, ["math", "code"])] == ["b", "c"]
    with pytest.raises(MoescopeError, match="no prompts in domain law; it has code, math, prose"):
        load_calibration(path, ["law"])
    with pytest.raises(MoescopeError, match="no prompts"):
        load_calibration(write(tmp_path, ""))


def test_messages_use_the_chat_template_when_there_is_one(tmp_path):
    messages = [{"role": "user", "content": "hello world"}]
    (prompt,) = load_calibration(write(tmp_path, json.dumps({"id": 1, "domain": "chat", "lang": "en",
                                                             "messages": messages})))
    assert prompt.id == "1"
    template = ("{% for m in messages %}<|im|> {{ m.role }} {{ m.content }} {% endfor %}"
                "{% if add_generation_prompt %}<|im|> assistant {% endif %}")
    tok = tokenizer(template)
    assert tok.convert_ids_to_tokens(render(prompt, tok)) == [
        "<|im|>", "user", "hello", "world", "<|im|>", "assistant"]
    plain = tokenizer()
    assert plain.convert_ids_to_tokens(render(prompt, plain)) == ["[UNK]", "hello", "world"]  # "user: hello world"


def test_token_cap_batches_and_hash(tmp_path):
    path = write(tmp_path, row(text="the cat sat the cat sat"), row(id="b"), row(id="c"))
    prompts = load_calibration(path)
    encoded = encode(prompts, tokenizer(), max_tokens=4)
    assert [len(e.ids) for e in encoded] == [4, 2, 2] and [e.truncated for e in encoded] == [True, False, False]
    assert [[e.prompt.id for e in b] for b in batches(encoded, 2)] == [["a", "b"], ["c"]]
    hashes = [p.hash for p in prompts]
    assert set_hash(hashes) == set_hash(hashes[::-1]) != set_hash(hashes[:2])
    edited = load_calibration(write(tmp_path, row(text="the cat sat the cat"), row(id="b"), row(id="c")))
    assert edited[0].hash != prompts[0].hash and edited[1].hash == prompts[1].hash


def test_calibration_windows_spread_over_the_file_and_clip(tmp_path):
    from helpers import tokenizer, write_calibration

    from moescope.calibration import calibration_windows, load_calibration, token_stream

    path = tmp_path / "cal.jsonl"
    write_calibration(path, 30)
    stream = token_stream(load_calibration(path), tokenizer())
    windows = calibration_windows(path, tokenizer(), count=3, length=8)
    stride = len(stream) // 3
    assert windows.tolist() == [stream[i * stride: i * stride + 8] for i in range(3)]
    assert windows[-1].tolist() != stream[16:24]  # not just the start of the file
    assert len(calibration_windows(path, tokenizer(), count=10**6, length=8)) == len(stream) // 8
    assert calibration_windows(path, tokenizer(), count=4, length=10**6).tolist() == [stream]
