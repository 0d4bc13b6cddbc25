"""The embedded demo assets: data sets validate, size limits hold, the shipped model loads and is good.

Model checks skip (with a reason) until scripts/train_demo_model.py has written the model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ASSETS = Path(__file__).resolve().parents[1] / "moescope" / "assets"
MODEL = ASSETS / "demo-moe"
DOMAINS = {"code", "math", "reasoning", "agent", "general", "multilingual"}
LANGS = {"en", "de", "fr", "es", "it", "ru", "zh", "ja"}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        pytest.skip(f"{path.name} not built yet (scripts/build_corpus.py)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_records(recs: list[dict]) -> None:
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for r in recs:
        assert r["domain"] in DOMAINS and r["lang"] in LANGS, r["id"]
        assert ("text" in r) != ("messages" in r), r["id"]
        if "text" in r:
            assert isinstance(r["text"], str) and r["text"].strip(), r["id"]
        else:
            assert all(m["role"] and isinstance(m["content"], str) for m in r["messages"]), r["id"]


def test_calibration_set() -> None:
    recs = read_jsonl(ASSETS / "calibration.jsonl")
    check_records(recs)
    assert len(recs) >= 180
    assert {r["domain"] for r in recs} == DOMAINS
    multi = Counter(r["lang"] for r in recs if r["domain"] == "multilingual")
    assert set(multi) == LANGS - {"en"} and min(multi.values()) >= 5, multi


def test_english_calibration_set() -> None:
    recs = read_jsonl(ASSETS / "calibration-english.jsonl")
    check_records(recs)
    assert len(recs) >= 180 and {r["lang"] for r in recs} == {"en"}
    assert {r["domain"] for r in recs} == DOMAINS - {"multilingual"}


def test_probes() -> None:
    recs = read_jsonl(ASSETS / "probes.jsonl")
    check_records(recs)
    assert len(recs) >= 60
    assert {r["domain"] for r in recs} == DOMAINS and {r["lang"] for r in recs} == LANGS
    for r in recs:
        assert r["expect"]["lang"] == r["lang"], r["id"]
        assert all(isinstance(t, str) and t for t in r["expect"].get("terms", [])), r["id"]


def test_items_are_labelled_multiple_choice() -> None:
    """The per-expert accuracy items load, and every answer is one of the names or yes / no in the puzzle."""
    from moescope.judge.accuracy import load_items

    items = load_items(ASSETS / "items.jsonl")
    assert len(items) >= 400
    for item in items:
        assert item.prompt.text.endswith("\nAnswer:") and "Reasoning" not in item.prompt.text
        right = item.choices[item.answer]
        assert right in ("yes", "no") or right in item.prompt.text


def test_no_overlap_between_sets() -> None:
    """No calibration prompt appears in a probe or in the held-out text (whole-text match)."""
    calib = read_jsonl(ASSETS / "calibration.jsonl") + read_jsonl(ASSETS / "calibration-english.jsonl")
    probes = read_jsonl(ASSETS / "probes.jsonl")
    held = " ".join(r.get("text", "") for f in (ASSETS / "heldout").glob("*.jsonl") for r in read_jsonl(f))
    texts = {r["text"] for r in calib if "text" in r}
    assert not texts & {r["text"] for r in probes if "text" in r}
    assert not [t for t in texts if len(t) > 100 and t in held]


def test_heldout_covers_every_domain() -> None:
    files = sorted((ASSETS / "heldout").glob("*.jsonl"))
    if not files:
        pytest.skip("heldout/ not built yet (scripts/build_corpus.py)")
    chars = Counter()
    for f in files:
        recs = read_jsonl(f)
        check_records(recs)
        assert {(r["domain"], r["lang"]) for r in recs} == {tuple(f.stem.split("-", 1))}
        chars[recs[0]["domain"]] += sum(len(r.get("text") or json.dumps(r.get("messages"))) for r in recs)
    assert set(chars) == DOMAINS
    assert min(chars.values()) >= 128 * 256  # at least one character per token needed


def test_heldout_has_128_windows_per_domain() -> None:
    """Every domain has 128 sequences of the model's context length (256 tokens) of held-out text."""
    if not (MODEL / "tokenizer.json").exists():
        pytest.skip("demo tokenizer not trained yet (scripts/train_demo_model.py)")
    from transformers import AutoTokenizer

    from moescope.calibration import HELDOUT
    from moescope.judge.evaluate import Protocol, load_windows

    tok = AutoTokenizer.from_pretrained(MODEL)
    windows = Counter()
    for (domain, _lang), rows in load_windows(HELDOUT, tok, Protocol(seq_len=256, sequences=10**6)).items():
        windows[domain] += len(rows)
    assert set(windows) == DOMAINS and min(windows.values()) >= 128, windows


def test_size_limits() -> None:
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    big = [p for p in files if p.stat().st_size > 20 * 2**20]
    assert not big, big
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    if MODEL.exists():
        assert sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file()) <= 30 * 2**20


@pytest.fixture(scope="module")
def demo():
    if not (MODEL / "model.safetensors").exists():
        pytest.skip("demo model not trained yet (scripts/train_demo_model.py)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared 2-core machines two threads can be several times slower
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(MODEL)
    torch.set_num_threads(threads)


def test_demo_model_shape(demo) -> None:
    model, tok = demo
    cfg = model.config
    assert cfg.model_type == "qwen3_moe" and cfg.num_hidden_layers >= 4
    assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 2
    assert len(tok) == cfg.vocab_size
    chat = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


# The even-routing model shipped until 2026-11-30 (`git show 5dbe0cd:moescope/assets/demo-moe/model.safetensors`
# beside a copy of the folder's other files), measured by the test below's own windows and code: the
# retrained model may not be worse (issue 21; DATASHEET.md has the full 128-window figures, 3.371 and 3.271).
PREVIOUS_MODEL_HELDOUT_LOSS = 3.328


def test_demo_model_heldout_perplexity(demo) -> None:
    """Perplexity on 16 held-out windows of every (domain, language) is far below the vocabulary size, and
    the mean loss over the groups is no worse than the previous demo model's on the same windows."""
    from moescope.calibration import HELDOUT
    from moescope.judge.evaluate import Protocol, load_windows
    from moescope.judge.nll import perplexity

    model, tok = demo
    windows = load_windows(HELDOUT, tok, Protocol(seq_len=model.config.max_position_embeddings, sequences=16), model)
    losses = {}
    for (domain, lang), rows in windows.items():
        ppl = perplexity(model, rows, batch_size=16)
        assert math.isfinite(ppl) and ppl < 200, (domain, lang, ppl)
        losses[domain, lang] = math.log(ppl)
    assert len(losses) == 12
    assert sum(losses.values()) / len(losses) <= PREVIOUS_MODEL_HELDOUT_LOSS, losses


# ---------------------------------------------------------------- routing of the shipped model (issue 21)
# The demo model must route like a production MoE (uneven, specialised, nothing dead), not like the
# near-uniform model an over-strong balance loss makes; DATASHEET.md has both models' figures.

ENTROPY_RANGE = (0.85, 0.93)  # mean entropy ratio over layers (Qwen3.5-35B-A3B: 0.91; the old demo: 0.99)
GINI_MIN = 0.35  # in at least half the layers (Qwen3.5: 0.53; the old demo: 0.09-0.17)
TOP_RATIO_MIN = 3.0  # busiest 10 % of experts / their fair share, in some layer (Qwen3.5: 5.2; old: 1.6)
LIFT_MIN = {"code": 4.0, "math": 4.0, "ja": 8.0, "zh": 8.0}  # see test_demo_experts_specialise


def profile_routing(model_dir: Path, out: Path) -> dict:
    """`moescope profile` over the full calibration set, then `moescope stats --json`, as a user runs them."""
    import contextlib
    import io

    import torch

    from moescope.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["profile", str(model_dir), "--calibration", str(ASSETS / "calibration.jsonl"),
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["stats", str(out), "--json"]) == 0
    return json.loads(text.getvalue())


@pytest.fixture(scope="module")
def routing(tmp_path_factory):
    if not (MODEL / "model.safetensors").exists():
        pytest.skip("demo model not trained yet (scripts/train_demo_model.py)")
    out = tmp_path_factory.mktemp("routing") / "profile"
    return profile_routing(MODEL, out), out


def test_demo_routing_is_uneven_like_a_real_moe(routing) -> None:
    stats, _ = routing
    layers = stats["layers"]
    assert ENTROPY_RANGE[0] <= stats["summary"]["mean"]["entropy_ratio"] <= ENTROPY_RANGE[1], stats["summary"]
    assert sum(x["gini"] >= GINI_MIN for x in layers) >= len(layers) / 2, [x["gini"] for x in layers]
    assert max(x["top_ratio"] for x in layers) >= TOP_RATIO_MIN, [x["top_ratio"] for x in layers]


def test_demo_routing_has_no_dead_expert(routing) -> None:
    """Uneven, not collapsed: every expert of every layer is chosen somewhere in the calibration set."""
    stats, _ = routing
    assert stats["summary"]["dead"] == 0, [(x["layer"], x["dead"]) for x in stats["layers"]]


def group_lift(counts: np.ndarray, min_selections: int = 200) -> np.ndarray:
    """[G, L, E] selections by group -> how many times more often each expert is chosen for a token of
    the group than for the average token of its layer (1 = indifferent); 0 for experts chosen fewer
    than `min_selections` times, whose mix is too noisy to call."""
    from moescope.analysis.specificity import group_mixes

    expert_mix, layer_mix = group_mixes(counts)
    return np.where(counts.sum(0) >= min_selections, expert_mix / layer_mix, 0.0)


def test_demo_experts_specialise(routing) -> None:
    """Some expert belongs to code, to math, to Japanese and to Chinese: it is chosen at least LIFT_MIN
    times as often for tokens of that group as for the average token. `stats` agrees: in some layer its
    most language-specific expert favours a language other than English."""
    from moescope.profiling.store import Profile

    stats, out = routing
    profile = Profile.load(out)
    lifts = {}
    for names, counts in ((profile.domains, profile.counters["selections"].sum(0)),
                          (profile.langs, profile.counters["lang_selections"].sum(0))):
        lift = group_lift(counts.astype(np.float64))
        lifts.update({name: float(lift[g].max()) for g, name in enumerate(names)})
    assert all(lifts[group] >= low for group, low in LIFT_MIN.items()), lifts
    favoured = {x["specificity"]["lang"]["favours"] for x in stats["layers"]}
    assert favoured - {"en"}, favoured
