"""The gate on real transformers models with injected faults.

The models are tiny Qwen3-MoE "successor tables": attention and expert outputs are zeroed, the
embeddings are one-hot, and the LM head maps each token to the token that must follow it, so greedy
decoding produces exactly the answer a test chooses. Each faulty candidate changes one or two
entries of the baseline's table: (a) a Chinese word mid-answer, (b) an early end, (c) a loop back
into the sentence, (d) an English answer to a Spanish probe. The gate must catch each with the
right reason; a collapse test in the seeds' style (minimum length + one keyword) passes them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.judge import safety
from moescope.judge.gate import GateOptions, answer_kl, fit_context, gate, load_probes
from moescope.models.tiny import tiny_model
from moescope.report.gate_page import highlight

SPANISH = "Pedro come pescado fresco en la casa con su buen amigo Juan ."
ENGLISH = "The river flows north into a cold sea near Oslo ."
RUSSIAN = "Кот спит дома на мягком диване ."
WRONG_LANGUAGE = "eats fresh fish at home with his good friend Juan ."
PROBES = [
    {"id": "es-1", "domain": "translate", "lang": "es", "expect": {"lang": "es", "terms": ["pescado", "amigo"]},
     "text": "Translate : Pedro eats fresh fish at home with his good friend Juan . <b>Spanish</b> Traducción"},
    {"id": "en-1", "domain": "general", "lang": "en", "text": "Where does the river go ? Answer",
     "expect": {"lang": "en", "terms": ["north"]}},
    {"id": "ru-1", "domain": "general", "lang": "ru", "text": "Где кот ? Ответ", "expect": {"lang": "ru"}},
]
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = SPECIAL + sorted({w for text in (SPANISH, ENGLISH, RUSSIAN, WRONG_LANGUAGE, "鱼", "extra")
                          for w in text.split()} | {w for p in PROBES for w in p["text"].split()})


def chain(start: str, text: str) -> dict[str, str]:
    """Successors that make greedy decoding after `start` produce `text` and then end."""
    words = text.split()
    return dict(zip([start, *words], [*words, "<eos>"]))


BASE = chain("Traducción", SPANISH) | chain("Answer", ENGLISH) | chain("Ответ", RUSSIAN)
FAULTS = {
    "script": BASE | {"pescado": "鱼", "鱼": "fresco"},
    "early": BASE | {"pescado": "."},
    "loop": BASE | {"amigo": "la"},
    "language": BASE | chain("Pedro", WRONG_LANGUAGE),
}


def tokenizer(vocab: list[str] = VOCAB) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def successor_model(table: dict[str, str]):
    """A real Qwen3-MoE whose greedy decoding follows `table` (token -> next token; others end)."""
    ids = {w: i for i, w in enumerate(VOCAB)}
    return helpers.successor_model({ids[a]: ids[b] for a, b in table.items()}, len(VOCAB), ids["<eos>"])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    out = {}
    for name, table in {"base": BASE, **FAULTS}.items():
        successor_model(table).save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
        out[name] = root / name
    out["probes"] = root / "probes.jsonl"
    out["probes"].write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROBES), encoding="utf-8")
    return out


@pytest.fixture(autouse=True)
def heuristic_language_id(monkeypatch):
    monkeypatch.setattr(safety, "_lingua", lambda: None)


def run_gate(dirs, candidate: str) -> dict:
    return gate(dirs["base"], dirs[candidate], dirs["probes"], GateOptions(max_new_tokens=32), log=lambda m: None)


def collapse_test(answer: str, keyword: str = "Pedro", min_chars: int = 15) -> bool:
    """The seeds' automated check: the answer is long enough and mentions a keyword."""
    return len(answer) >= min_chars and keyword in answer


def test_successor_model_answers_as_designed(dirs):
    report = run_gate(dirs, "base")
    answers = {r["id"]: r["baseline"] for r in report["prompts"]}
    assert answers == {"es-1": SPANISH, "en-1": ENGLISH, "ru-1": RUSSIAN}


def test_model_against_itself_passes(dirs, tmp_path):
    out, js = tmp_path / "gate.html", tmp_path / "gate.json"
    code = main(["gate", str(dirs["base"]), str(dirs["base"]), "--probes", str(dirs["probes"]), "--out", str(out),
                 "--json", str(js), "--max-new-tokens", "32"])
    report = json.loads(js.read_text(encoding="utf-8"))
    assert code == 0 and report["verdict"] == "pass"
    assert all(c["verdict"] == "pass" for r in report["prompts"] for c in r["checks"])
    kl = [c for c in report["prompts"][0]["checks"] if c["name"] == "kl"][0]
    assert "mean KL 0.000" in kl["reason"]
    assert "Every probe passed" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("fault", "check", "answer"),
    [
        ("script", "script", "Pedro come pescado 鱼 fresco en la casa con su buen amigo Juan ."),
        ("early", "length", "Pedro come pescado ."),
        ("loop", "repetition", "Pedro come pescado fresco en la casa con su buen amigo la casa con su buen amigo"),
        ("language", "language", "Pedro eats fresh fish at home with his good friend Juan ."),
    ],
)
def test_fault_is_caught_with_the_right_reason(dirs, fault, check, answer):
    report = run_gate(dirs, fault)
    rows = {r["id"]: r for r in report["prompts"]}
    row = rows["es-1"]
    assert row["candidate"].startswith(answer)
    checks = {c["name"]: c for c in row["checks"]}
    assert checks[check]["verdict"] == "fail", checks[check]
    assert checks["kl"]["verdict"] == "fail"  # the candidate's distributions left the baseline's answer
    assert report["verdict"] == "fail"
    assert rows["en-1"]["verdict"] == rows["ru-1"]["verdict"] == "pass"  # untouched probes stay clean
    # the seeds' collapse test passes the same broken answer
    assert collapse_test(row["candidate"])
    if fault == "script":
        ev = checks["script"]["evidence"]
        assert [(e["start"], row["candidate"][e["start"]:e["end"]]) for e in ev] == [(19, "鱼")]
        assert checks["language"]["verdict"] == checks["length"]["verdict"] == "pass"
    if fault == "loop":
        assert checks["language"]["verdict"] == checks["script"]["verdict"] == "pass"
    if fault == "language":
        assert "candidate en, baseline es, expected es" in checks["language"]["reason"]
        assert checks["script"]["verdict"] == "pass"  # both Latin: the script check alone would miss it


def test_cli_writes_html_with_evidence_and_exit_code(dirs, tmp_path):
    out = tmp_path / "sub" / "gate.html"
    code = main(["gate", str(dirs["base"]), str(dirs["script"]), "--probes", str(dirs["probes"]),
                 "--out", str(out), "--max-new-tokens", "32"])
    page = out.read_text(encoding="utf-8")
    assert code == 1  # did not pass (2 is kept for "could not run")
    assert '<mark title="script: Hani: not used by the prompt or the baseline">鱼</mark>' in page
    assert "&lt;b&gt;Spanish&lt;/b&gt;" in page and "<b>Spanish" not in page  # model and prompt text escaped
    assert "http" not in page and "<script" not in page
    assert [p.name for p in out.parent.iterdir()] == ["gate.html"]  # no temporary file left behind


def test_thresholds_turn_failures_into_warnings(dirs, tmp_path, capsys):
    """A warning stops CI like a failure (exit 1) unless --fail-on fail lets it through (exit 0)."""
    args = ["gate", str(dirs["base"]), str(dirs["early"]), "--probes", str(dirs["probes"]),
            "--out", str(tmp_path / "g.html"), "--max-new-tokens", "32", "--overwrite"]
    assert main(args) == 1 and "verdict: fail" in capsys.readouterr().out
    lenient = ["--threshold", "length_fail=0.1", "--threshold", "terms_fail_drop=1", "--threshold", "kl_fail=100"]
    assert main(args + lenient) == 1 and "verdict: warn" in capsys.readouterr().out
    assert main(args + lenient + ["--fail-on", "fail"]) == 0
    assert main(args + ["--fail-on", "fail"]) == 1


def test_different_tokenizer_is_refused(dirs, tmp_path):
    other = tmp_path / "other"
    successor_model(BASE).save_pretrained(other)
    swapped = VOCAB.copy()
    swapped[4], swapped[5] = swapped[5], swapped[4]
    tokenizer(swapped).save_pretrained(other)
    with pytest.raises(MoescopeError, match=f"tokenizers differ: token '{min(VOCAB[4:6])}' has id"):
        gate(dirs["base"], other, dirs["probes"], log=lambda m: None)
    tokenizer(VOCAB + ["more"]).save_pretrained(other)
    with pytest.raises(MoescopeError, match=f"vocabulary sizes differ \\({len(VOCAB)} vs {len(VOCAB) + 1}\\)"):
        gate(dirs["base"], other, dirs["probes"], log=lambda m: None)
    bare = tmp_path / "bare"
    successor_model(BASE).save_pretrained(bare)
    with pytest.raises(MoescopeError, match="bare: no usable tokenizer"):
        gate(dirs["base"], bare, dirs["probes"], log=lambda m: None)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "x", "domain": "d", "text": "hi"}, "probes.jsonl:2: missing field 'lang'"),
        ({"id": "x", "domain": "d", "lang": "en", "text": "hi", "expect": ["en"]}, "probes.jsonl:2: 'expect' must"),
        ({"id": "x", "domain": "d", "lang": "en", "text": "hi", "expect": {"terms": "north"}},
         "probes.jsonl:2: 'expect.terms' must be a list"),
    ],
)
def test_bad_probes_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps(PROBES[1]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(MoescopeError, match=message):
        load_probes(path)


def test_answer_kl_scores_the_candidate_against_the_baseline():
    """KL(baseline || candidate) at each answer token, teacher-forced, against a float64 recount; both
    models' LM heads scaled to different confidence, so that the two directions differ clearly."""
    base, cand = tiny_model("qwen3_moe"), tiny_model("qwen3_moe", seed=1)
    with torch.no_grad():
        base.lm_head.weight.mul_(3)
        cand.lm_head.weight.mul_(15)
    prompt, answer = [5, 9, 14, 3], [7, 7, 21, 2, 30]
    kl, top1 = answer_kl(base, cand, prompt, answer)
    with torch.no_grad():
        ids = torch.tensor([prompt + answer])
        p = base(input_ids=ids).logits[0, 3:8].double().log_softmax(-1)
        q = cand(input_ids=ids).logits[0, 3:8].double().log_softmax(-1)
    forward, backward = (p.exp() * (p - q)).sum(-1), (q.exp() * (q - p)).sum(-1)
    assert ((forward - backward).abs() > 0.03 * forward).all()  # far beyond the rel=1e-4 below
    assert kl == pytest.approx(forward.tolist(), rel=1e-4, abs=1e-6)
    assert top1 == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).double().mean()))
    assert answer_kl(base, cand, prompt, []) == ([], 1.0)  # nothing answered: nothing to disagree on
    other = tiny_model("qwen3_moe", vocab_size=64)
    with pytest.raises(MoescopeError, match=rf"output vocabularies differ \({base.config.vocab_size} vs 64 logits\)"):
        answer_kl(base, other, prompt, answer)


def test_prompts_are_cut_to_fit_the_context():
    config = type("Config", (), {"max_position_embeddings": 10})()
    assert fit_context([[1, 2, 3], list(range(12))], config, 4) == ([[1, 2, 3], list(range(6, 12))], 1)
    with pytest.raises(MoescopeError, match="leaves no room"):
        fit_context([[1]], config, 10)


def test_highlight_escapes_and_merges_overlaps():
    text = "a <b> c"
    page = highlight(text, [(2, 5, "x"), (4, 7, "y")])
    assert page == 'a <mark title="x">&lt;b</mark><mark title="x; y">&gt;</mark><mark title="y"> c</mark>'


DEMO = Path(__file__).resolve().parents[1] / "moescope" / "assets" / "demo-moe"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="the demo model is not trained yet")
def test_demo_model_passes_itself_and_fails_when_heavily_pruned(tmp_path):
    """The issue's must-show: 25 % of experts removed by frequency, profiled on English only."""
    english = DEMO.parent / "calibration-english.jsonl"
    probes = tmp_path / "probes.jsonl"
    lines = (DEMO.parent / "probes.jsonl").read_text(encoding="utf-8").splitlines()
    probes.write_text("\n".join(lines[::4]) + "\n", encoding="utf-8")  # every domain and language, 23 probes
    common = ["--probes", str(probes), "--max-new-tokens", "48"]
    assert main(["gate", str(DEMO), str(DEMO), "--out", str(tmp_path / "self.html"), *common]) == 0
    assert main(["profile", str(DEMO), "--calibration", str(english), "--out", str(tmp_path / "profile")]) == 0
    assert main(["plan", "prune", str(tmp_path / "profile"), "--criterion", "frequency", "--ratio", "0.25",
                 "--out", str(tmp_path / "plan.json")]) == 0
    assert main(["prune", str(DEMO), "--plan", str(tmp_path / "plan.json"), "--method", "remove",
                 "--out", str(tmp_path / "pruned"), "--replay-prompts", "0"]) == 0
    report_path = tmp_path / "pruned.json"
    code = main(["gate", str(DEMO), str(tmp_path / "pruned"), "--out", str(tmp_path / "pruned.html"),
                 "--json", str(report_path), *common])
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert code == 1 and report["verdict"] == "fail"
    failed = [c for r in report["prompts"] for c in r["checks"] if c["verdict"] == "fail"]
    assert any(c["evidence"] for c in failed)
