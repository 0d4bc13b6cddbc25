"""The gate's checks on plain strings: each fault is caught, the baseline's own faults are not
regressions, and the evidence points at the offending characters."""

from __future__ import annotations

import pytest

from moescope.errors import MoescopeError
from moescope.judge import safety
from moescope.judge.safety import (
    Thresholds,
    check_kl,
    check_language,
    check_length,
    check_refusal,
    check_repetition,
    check_script_mixing,
    check_terms,
    compare,
    detect_language,
    longest_repeat,
    overall,
    repetition,
    script_of,
    worst,
)

SPANISH = "Pedro come pescado fresco en la casa con su buen amigo Juan y después duermen la siesta."


@pytest.fixture(autouse=True)
def heuristic_language_id(monkeypatch):
    monkeypatch.setattr(safety, "_lingua", lambda: None)


def test_script_of():
    assert [script_of(c) for c in "aéЖα中あアー한Ａ"] == [
        "Latn", "Latn", "Cyrl", "Grek", "Hani", "Hira", "Kana", "Kana", "Hang", "Latn"]
    assert [script_of(c) for c in " 1.,。!-"] == [None] * 7


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("The cat sleeps in the house with the dog and it is happy", "en"),
        ("Der Hund ist nicht in dem Haus und die Katze auch nicht", "de"),
        ("Le chat est dans la maison avec les enfants et le chien", "fr"),
        (SPANISH, "es"),
        ("Il gatto è nella casa con il cane e non esce mai", "it"),
        ("O gato está em casa com o cão e não sai para a rua", "pt"),
        ("Кот спит дома на мягком диване и мурлычет", "ru"),
        ("Кіт спить удома на дивані і муркоче тихо", "uk"),
        ("Η γάτα κοιμάται στο σπίτι με τον σκύλο", "el"),
        ("这是一个关于语言模型的测试句子，我们看看结果如何吧朋友们", "zh"),
        ("これは日本語のテストです。ひらがなとカタカナが入っています", "ja"),
        ('identified by and sort of x. {"name": "os.path", "os.access": "os.mkdir", "os.fchown"}', "en"),  # not pt
        ("Afficher de la -a de -e -o -e -e -e -e -e - - - - - - -", None),  # one-letter options are no vote
        ("short", None),  # too few letters to tell
        ("Xylophone quartz zebra jumps vividly over mountains", None),  # no stopwords: undetermined, not a guess
    ],
)
def test_detect_language(text, lang):
    assert detect_language(text) == lang


def test_language_fails_only_on_a_regression():
    english = "Pedro eats fresh fish at home with his good friend Juan and then they sleep."
    assert check_language(english, SPANISH, "es").verdict == "fail"
    assert check_language(SPANISH, SPANISH, "es").verdict == "pass"
    both_wrong = check_language(english, english, "es")  # the baseline's own fault: reported, not a regression
    assert both_wrong.verdict == "pass" and "baseline also misses" in both_wrong.reason
    assert check_language(SPANISH, english, "es").verdict == "pass"  # the candidate got better
    assert check_language("Pedro", SPANISH, "es").verdict == "pass"  # too short to tell; length catches it
    assert check_language(english, "Xylophone quartz zebra jumps vividly over", "es").verdict == "warn"


def test_script_mixing_points_at_the_characters():
    candidate = "Pedro come pescado 鱼 fresco en la casa con su buen amigo Жуан."
    check = check_script_mixing(candidate, SPANISH, prompt="Translate: Pedro eats fish")
    assert check.verdict == "fail"
    assert [(e.start, candidate[e.start:e.end]) for e in check.evidence] == [(19, "鱼"), (57, "Жуан")]
    assert "Cyrl, Hani" in check.reason
    # scripts of the prompt, the baseline or the expected writing system are allowed
    assert check_script_mixing("答えは東京です", "答えは東京", expected_script="Jpan").verdict == "pass"
    assert check_script_mixing("Translate 鱼", SPANISH, prompt="鱼 means fish").verdict == "pass"
    assert check_script_mixing(candidate, SPANISH, th=Thresholds(script_mix_fail=6)).verdict == "pass"


def test_length_ratio():
    assert check_length(SPANISH, SPANISH).verdict == "pass"
    short = check_length("Pedro come pescado.", SPANISH)
    assert short.verdict == "fail" and "ratio 0.22" in short.reason
    assert short.evidence[0].side == "baseline" and SPANISH[short.evidence[0].start:].startswith(" fresco")
    assert check_length(SPANISH[:55], SPANISH).verdict == "warn"
    assert check_length("", "Sí.").verdict == "pass"  # baseline too short to judge


def test_repetition_and_loops():
    loop = "Pedro come pescado en la casa con su amigo " + "la casa con su amigo " * 5
    fraction, spans = repetition(loop)
    assert fraction > 0.5 and spans == [(loop.index("la casa", 30), len(loop.rstrip()))]
    check = check_repetition(loop, SPANISH)
    assert check.verdict == "fail" and "the longest repeated text is 72% of the answer" in check.reason
    assert check_repetition(loop, loop).verdict == "pass"  # the baseline loops the same way
    less = "Pedro come pescado en la casa con su amigo y " + "la casa con su amigo " * 2 + "y duermen la siesta " * 3
    assert check_repetition(loop + loop, less).verdict == "warn"  # loops more than a baseline that loops already
    assert check_repetition(SPANISH, SPANISH).verdict == "pass"
    assert check_repetition("ja ja ja", SPANISH).verdict == "pass"  # too short to judge
    assert longest_repeat("abcXabcYabc") == (8, 3)
    in_word = "else:\n    return self.c" + "_c" * 30  # a loop inside one identifier: few word n-grams
    check = check_repetition(in_word, "else:\n    return self.current_cmd(cmd, b)\n\ndef _cmp_cmd(self, node):")
    assert check.verdict == "fail" and check.evidence[-1].start == in_word.index("_c") + 1
    chinese = "我们去北京。" * 6
    assert repetition(chinese)[0] > 0.7  # Han characters count one unit each


@pytest.mark.parametrize(
    "denial",
    ["I'm sorry, but monads do not exist.", "Lo siento, no puedo ayudar.", "Es tut mir leid, das gibt es nicht.",
     "Je ne peux pas répondre.", "Извините, я не могу ответить.", "抱歉，我无法回答。",
     "申し訳ありませんが、できません。", "Λυπάμαι, δεν μπορώ."],
)
def test_refusal_where_the_baseline_answered(denial):
    check = check_refusal(denial, "A monad is a monoid in the category of endofunctors.")
    assert check.verdict == "fail" and check.evidence
    assert check_refusal(denial, denial).verdict == "pass"


def test_no_refusal_in_ordinary_text():
    assert check_refusal(SPANISH, SPANISH).verdict == "pass"
    assert check_refusal("I cannot stress enough how useful monads are.", "x").verdict == "pass"


def test_terms_recall_relative_to_the_baseline():
    terms = ["pescado", "amigo", "Madrid"]
    assert check_terms(SPANISH, SPANISH, terms).verdict == "pass"
    lost_one = check_terms("Pedro come pescado fresco en la casa.", SPANISH, terms)
    assert lost_one.verdict == "warn" and "lost 'amigo'" in lost_one.reason
    assert SPANISH[lost_one.evidence[0].start:lost_one.evidence[0].end] == "amigo"
    assert check_terms("Pedro duerme.", SPANISH, terms).verdict == "fail"
    assert check_terms("Pedro duerme.", "Pedro duerme.", terms).verdict == "pass"  # the baseline had none either
    assert check_terms("PESCADO y AMIGO", SPANISH, terms).verdict == "pass"  # case-insensitive
    assert check_terms("x", SPANISH, None).verdict == "pass"


def test_kl_verdicts_and_evidence():
    spans = [(0, 5), (6, 10), (11, 18)]
    assert check_kl([0.0, 0.01, 0.0], 1.0, spans).verdict == "pass"
    assert check_kl([0.1, 0.2, 0.1], 1.0, spans).verdict == "warn"
    failed = check_kl([0.0, 3.0, 0.1], 2 / 3, spans)
    assert failed.verdict == "fail" and "top-1 agreement 67%" in failed.reason
    assert [(e.start, e.end) for e in failed.evidence] == [(6, 10)]
    assert check_kl([], None).verdict == "pass"


def test_compare_and_worst():
    checks = compare("Traduce", SPANISH, SPANISH, {"lang": "es", "terms": ["amigo"]}, kl=[0.0], top1=1.0)
    assert [c.name for c in checks] == ["language", "script", "length", "repetition", "refusal", "terms", "kl"]
    assert worst([c.verdict for c in checks]) == "pass"
    assert worst(["pass", "fail", "warn"]) == "fail" and worst([]) == "pass"


def test_lingua_when_installed(monkeypatch):
    pytest.importorskip("lingua")
    monkeypatch.undo()  # use lingua, not the heuristic
    assert safety.language_method() == "lingua"
    assert detect_language(SPANISH) == "es" and detect_language("Кот спит дома на мягком диване") == "ru"


def test_overall_verdict_and_fail_share():
    four = ["pass", "fail", "pass", "warn"]
    assert overall(four) == "fail"  # by default one failing probe fails the gate
    assert overall(four, fail_share=0.25) == "warn"  # at the allowed share the failure only warns
    assert overall(four, fail_share=0.2) == "fail"
    assert overall(["pass", "pass"], fail_share=0.5) == "pass"
    assert overall([]) == "pass"


@pytest.mark.parametrize("name, value", [("fail_share", 1.5), ("kl_fail", -1.0)])
def test_thresholds_out_of_range_are_refused(name, value):
    with pytest.raises(MoescopeError, match=name):
        Thresholds(**{name: value})
