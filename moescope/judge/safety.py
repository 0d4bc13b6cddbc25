"""The regression gate's checks: compare a candidate's answer with the baseline's answer to the same
prompt, and say pass / warn / fail with a reason and the evidence.

Every check is relative to the baseline: a fault the baseline already has (it also answers in the
wrong language, it also loops) is reported in the reason but is not a regression, so a model always
passes against itself. Evidence is a list of character spans in the answer texts (which side, where,
why), so the HTML page can highlight exactly the offending characters.

Pure Python on purpose (unicodedata, re): the checks run on stored answers, in CI, without torch.
Language identification uses `lingua` when it is installed (the optional `lang` extra) and otherwise
a small built-in heuristic: the Unicode script decides for scripts used by one language here
(Cyrillic -> ru or uk, Greek -> el, kana -> ja, Han alone -> zh, Hangul -> ko, ...), and for Latin
text a vote of stopwords from short lists for en, de, fr, es, it, pt and nl. The heuristic answers
"undetermined" rather than guess on short or ambiguous text; docs/gate.md says what it can't do.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, fields

from moescope.errors import MoescopeError

VERDICTS = ("pass", "warn", "fail")


@dataclass(frozen=True)
class Thresholds:
    """When a difference from the baseline becomes a warning or a failure. Defaults are starting
    points chosen on the seeds' failures and the fault-injection tests; docs/gate.md explains each."""

    lang_min_letters: int = 20  # fewer letters than this: the language is "undetermined", never a failure
    script_mix_fail: int = 1  # characters from a script that neither the prompt nor the baseline used
    length_min_chars: int = 40  # baselines shorter than this are too short for a meaningful ratio
    length_warn: float = 0.7  # candidate length / baseline length below this: warn
    length_fail: float = 0.4  # ... below this: fail (the seeds' river crossing was 206 / 1119 = 0.18)
    repeat_n: int = 3  # n-gram size (words; single characters in Chinese / Japanese text)
    repeat_min_chars: int = 40  # shorter answers are not judged for repetition
    repeat_warn: float = 0.3  # share of n-grams that repeat an earlier one: warn ...
    repeat_fail: float = 0.5  # ... fail
    repeat_margin: float = 0.2  # ... and only when at least this much above the baseline's share
    terms_fail_drop: float = 0.5  # losing this share of the expected terms the baseline produced: fail
    kl_warn: float = 0.1  # mean KL(baseline || candidate) along the baseline's answer, nats per token
    kl_fail: float = 0.5
    kl_mark: float = 1.0  # tokens above this KL are highlighted as evidence
    fail_share: float = 0.0  # overall: fail when more than this share of probes fail (fewer failing probes: warn)

    def __post_init__(self) -> None:
        negative = [f.name for f in fields(self) if getattr(self, f.name) < 0]
        if negative:
            raise MoescopeError(f"thresholds cannot be negative: {', '.join(negative)}")
        if self.fail_share > 1:
            raise MoescopeError(f"fail_share is a share of probes, between 0 and 1 (got {self.fail_share})")
        if self.repeat_n < 1:
            raise MoescopeError(f"repeat_n is an n-gram size, at least 1 (got {self.repeat_n})")


DEFAULTS = Thresholds()


@dataclass
class Evidence:
    """A span of an answer (`side` is "baseline" or "candidate"), with why it matters."""

    side: str
    start: int
    end: int
    note: str


@dataclass
class Check:
    name: str
    verdict: str
    reason: str
    evidence: list[Evidence] = field(default_factory=list)


def worst(verdicts: list[str]) -> str:
    """The most severe of some verdicts ("pass" for none)."""
    return max(verdicts, key=VERDICTS.index, default="pass")


def overall(verdicts: list[str], fail_share: float = 0.0) -> str:
    """The gate's verdict over probes: fail when more than `fail_share` of them fail, else the worst
    verdict with any remaining failures counted as warnings (the default 0 lets no failure through)."""
    if verdicts and verdicts.count("fail") / len(verdicts) > fail_share:
        return "fail"
    return worst(["warn" if v == "fail" else v for v in verdicts])


# First word of a letter's Unicode name -> ISO 15924 code. Letters of other scripts keep their name.
SCRIPT_CODES = {
    "LATIN": "Latn", "CYRILLIC": "Cyrl", "GREEK": "Grek", "CJK": "Hani", "IDEOGRAPHIC": "Hani",
    "HIRAGANA": "Hira", "KATAKANA": "Kana", "HANGUL": "Hang", "ARABIC": "Arab", "HEBREW": "Hebr",
    "DEVANAGARI": "Deva", "THAI": "Thai", "ARMENIAN": "Armn", "GEORGIAN": "Geor", "BENGALI": "Beng",
}
# Writing systems that combine scripts (as in probe files' `expect.script`).
SCRIPT_SETS = {"Hans": {"Hani"}, "Hant": {"Hani"}, "Jpan": {"Hani", "Hira", "Kana"}, "Kore": {"Hang", "Hani"}}


@functools.lru_cache(maxsize=4096)
def script_of(char: str) -> str | None:
    """ISO 15924 code of a letter's script; None for digits, punctuation, spaces and symbols, which
    every script shares."""
    if not unicodedata.category(char).startswith("L"):
        return None
    words = re.split(r"[ -]", unicodedata.name(char, "UNKNOWN"))
    if words[0] in ("FULLWIDTH", "HALFWIDTH") and len(words) > 1:
        words = words[1:]
    return SCRIPT_CODES.get(words[0], words[0].title())


def scripts(text: str) -> Counter:
    """Letters per script."""
    return Counter(s for s in map(script_of, text) if s)


def check_script_mixing(candidate: str, baseline: str, prompt: str = "", expected_script: str | None = None,
                        th: Thresholds = DEFAULTS) -> Check:
    """Letters from scripts that neither the prompt, the baseline's answer nor the expected script
    used (the seeds' Chinese character inside a Spanish translation)."""
    allowed = set(scripts(prompt)) | set(scripts(baseline))
    if expected_script:
        allowed |= SCRIPT_SETS.get(expected_script, {expected_script})
    evidence: list[Evidence] = []
    for i, char in enumerate(candidate):
        script = script_of(char)
        if script and script not in allowed:
            last = evidence[-1] if evidence else None
            if last and last.end == i and last.note.startswith(script):
                last.end = i + 1
            else:
                evidence.append(Evidence("candidate", i, i + 1, f"{script}: not used by the prompt or the baseline"))
    count = sum(e.end - e.start for e in evidence)
    if count < th.script_mix_fail:
        return Check("script", "pass", f"only scripts of the prompt and baseline ({', '.join(sorted(allowed))})")
    shown = ", ".join(f"{candidate[e.start:e.end]!r} at {e.start}" for e in evidence[:5])
    new = sorted({e.note.split(":")[0] for e in evidence})
    return Check("script", "fail", f"{count} letter(s) of {', '.join(new)} that the baseline never used: {shown}",
                 evidence[:50])


STOPWORDS = {lang: set(words.split()) for lang, words in {
    "en": "the a an and of to is in that it with for as was on are this be by not or his her they you at from "
          "have which will can there were been would",
    "de": "der die das und ist nicht ein eine zu den mit sich auf für von dem des auch werden wird sind oder wie "
          "aus bei kann ich es über nach noch wenn",
    "fr": "le la les et est des une un du que dans pour pas sur qui au avec ce il sont par ne se aux cette nous "
          "vous ou mais très aussi leur comme",
    "es": "el la los las y es de que en un una del por con para no se su al lo como más pero sus le fue está "
          "son muy también hay este esta cuando donde desde",
    "it": "il lo la gli le e è di che un una del della per non con sono si da nel alla come anche più questo ha "
          "ma molto questa quando dove nella degli",
    "pt": "o a os as e é de que em um uma do da não para com por se no na mais como mas são ao dos muito "
          "também quando onde isso",
    "nl": "de het een en is van dat niet op te zijn met voor ook aan er maar als bij wordt worden hij ze om",
}.items()}
SHARED = Counter(word for words in STOPWORDS.values() for word in words)  # a word in k lists votes 1/k each

# Words of letters, not parts of identifiers (os.path, dir_fd) or options (-e): code is not prose.
WORDS = re.compile(r"(?<![\w.-])[^\W\d_]+(?![\w]|\.\w)")
SCRIPT_LANGS = {"Grek": "el", "Hang": "ko", "Arab": "ar", "Hebr": "he", "Deva": "hi", "Thai": "th",
                "Armn": "hy", "Geor": "ka", "Beng": "bn"}


def _heuristic_language(text: str, letters: Counter) -> str | None:
    main = letters.most_common(1)[0][0]
    if main in ("Hani", "Hira", "Kana"):
        return "ja" if letters["Hira"] + letters["Kana"] > 0.05 * letters["Hani"] else "zh"
    if main == "Cyrl":
        return "uk" if re.search(r"[іїєґІЇЄҐ]", text) else "ru"
    if main != "Latn":
        return SCRIPT_LANGS.get(main)
    score: Counter = Counter()
    for word in WORDS.findall(text.lower()):
        score.update({lang: 1 / SHARED[word] for lang, words in STOPWORDS.items() if word in words})
    ranked = score.most_common(2) + [("", 0.0)] * 2
    (best, top), (_, second) = ranked[0], ranked[1]
    return best if top >= 1.5 and top >= 1.25 * second else None


@functools.cache
def _lingua():
    try:
        from lingua import LanguageDetectorBuilder
    except ImportError:
        return None
    return LanguageDetectorBuilder.from_all_languages().build()


def language_method() -> str:
    """Which language identifier `detect_language` uses: "lingua" or "heuristic"."""
    return "heuristic" if _lingua() is None else "lingua"


def detect_language(text: str, min_letters: int = 20) -> str | None:
    """ISO 639-1 code of the text's language, or None when it is too short or unclear to tell."""
    letters = scripts(text)
    if sum(letters.values()) < min_letters:
        return None
    if language_method() == "lingua":
        found = _lingua().detect_language_of(text)
        return found.iso_code_639_1.name.lower() if found else None
    return _heuristic_language(text, letters)


def check_language(candidate: str, baseline: str, expected: str | None, th: Thresholds = DEFAULTS) -> Check:
    """The candidate's answer language against the expected language and the baseline's."""
    expected = expected.split("-")[0].lower() if expected else None
    cand, base = detect_language(candidate, th.lang_min_letters), detect_language(baseline, th.lang_min_letters)
    said = f"candidate {cand or 'undetermined'}, baseline {base or 'undetermined'}, expected {expected or '-'}"
    said += f" ({language_method()})"
    if cand is None or cand == base or (expected and cand == expected):
        note = "; the baseline also misses the expected language" if expected and base and base != expected else ""
        return Check("language", "pass", said + note)
    if base is None:
        return Check("language", "warn" if expected else "pass", said)
    return Check("language", "fail", said)


def check_length(candidate: str, baseline: str, th: Thresholds = DEFAULTS) -> Check:
    """A much shorter answer than the baseline's: truncated reasoning, an early end of text."""
    cand, base = len(candidate.strip()), len(baseline.strip())
    if base < th.length_min_chars:
        return Check("length", "pass", f"baseline too short to judge ({base} characters)")
    ratio = cand / base
    said = f"{cand} characters vs the baseline's {base} (ratio {ratio:.2f})"
    verdict = "fail" if ratio < th.length_fail else "warn" if ratio < th.length_warn else "pass"
    if verdict == "pass":
        return Check("length", verdict, said)
    common = len(os.path.commonprefix([candidate, baseline]))
    return Check("length", verdict, said, [Evidence("baseline", common, len(baseline), "missing from the candidate")])


# Han and kana characters are units on their own (no spaces between words); other letters form words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
UNITS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def repetition(text: str, n: int = 3) -> tuple[float, list[tuple[int, int]]]:
    """Share of word n-grams that repeat an earlier n-gram, and the character spans of the repeats."""
    units = list(UNITS.finditer(text))
    grams = [tuple(m.group().lower() for m in units[i:i + n]) for i in range(len(units) - n + 1)]
    seen: set[tuple[str, ...]] = set()
    spans: list[tuple[int, int]] = []
    for i, gram in enumerate(grams):
        if gram in seen:
            start, end = units[i].start(), units[i + n - 1].end()
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        seen.add(gram)
    return (len(grams) - len(set(grams))) / max(len(grams), 1), spans


def longest_repeat(text: str) -> tuple[int, int]:
    """Start of the later occurrence and length of the longest substring that occurs twice
    (occurrences may overlap: a loop with period p over n characters repeats n - p of them).
    Catches loops inside one word (`c_c_c_c_`) that word n-grams cannot see."""
    text = text[:4000]
    suffixes = sorted(range(len(text)), key=lambda i: text[i:])
    start, length = 0, 0
    for a, b in zip(suffixes, suffixes[1:]):
        common = len(os.path.commonprefix([text[a:], text[b:]]))
        if common > length:
            start, length = max(a, b), common
    return start, length


def check_repetition(candidate: str, baseline: str, th: Thresholds = DEFAULTS) -> Check:
    """Degenerate loops: repeated word n-grams, or one stretch of text repeating itself, well
    beyond what the baseline repeats (a failure only where the baseline did not loop). The score is
    the larger of the share of repeated n-grams and the share of the answer covered by its longest
    repeated substring."""
    if len(candidate.strip()) < th.repeat_min_chars:
        return Check("repetition", "pass", "answer too short to judge")
    (cand_ngrams, spans), (base_ngrams, _) = repetition(candidate, th.repeat_n), repetition(baseline, th.repeat_n)
    start, length = longest_repeat(candidate)
    cand_longest, base_longest = length / len(candidate), longest_repeat(baseline)[1] / max(len(baseline), 1)
    cand, base = max(cand_ngrams, cand_longest), max(base_ngrams, base_longest)
    said = (f"{cand_ngrams:.0%} of {th.repeat_n}-grams repeat (baseline {base_ngrams:.0%}); the longest repeated "
            f"text is {cand_longest:.0%} of the answer (baseline {base_longest:.0%})")
    worse = cand - base >= th.repeat_margin
    verdict = "fail" if worse and cand >= th.repeat_fail else "warn" if worse and cand >= th.repeat_warn else "pass"
    if verdict == "pass":
        return Check("repetition", verdict, said)
    if verdict == "fail" and base >= th.repeat_warn:  # the baseline loops too: looping more is a warning
        verdict, said = "warn", said + "; the baseline already repeats itself"
    evidence = [Evidence("candidate", s, e, "repeats earlier text") for s, e in spans]
    evidence.append(Evidence("candidate", start, start + length, "longest repeated text"))
    return Check("repetition", verdict, said, evidence)


# Phrases that deny, refuse or disclaim, per language. Matched case-insensitively anywhere in the
# answer, so they are kept specific: a match is only a failure when the baseline had none.
REFUSALS = [
    # en
    r"\bI(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bI (?:can(?:no|')t|cannot|won't|will not) (?:help|answer|provide|do)",
    r"\bas an AI\b", r"\b(?:does|do) not (?:actually )?exist\b", r"\bthere (?:is|are) no such\b",
    r"\bI don't know\b",
    # de
    r"\bes tut mir leid\b", r"\bich kann (?:dir |Ihnen )?(?:nicht|keine)\b", r"\b(?:existiert|existieren) nicht\b",
    r"\bgibt es nicht\b",
    # fr
    r"\bje suis désolée?\b", r"\bje ne peux pas\b", r"\bn'existe(?:nt)? pas\b",
    # es
    r"\blo siento\b", r"\bno puedo\b", r"\bno existen?\b",
    # it
    r"\bmi dispiace\b", r"\bnon posso\b", r"\bnon esiste\b",
    # pt
    r"\bdesculpe\b", r"\bnão posso\b", r"\bnão existe\b",
    # ru
    r"извините", r"\bя не могу\b", r"не существует",
    # el
    r"λυπάμαι", r"δεν μπορώ", r"δεν υπάρχει",
    # zh, ja (no word boundaries)
    r"抱歉", r"对不起", r"我不能", r"我无法", r"不存在",
    r"申し訳", r"できません", r"存在しません",
]
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSALS), re.IGNORECASE)


def check_refusal(candidate: str, baseline: str, th: Thresholds = DEFAULTS) -> Check:
    """A denial or refusal in the candidate where the baseline answered (the seeds' "monads do not
    exist")."""
    found = list(_REFUSAL.finditer(candidate))
    if not found:
        return Check("refusal", "pass", "no refusal or denial phrase")
    if _REFUSAL.search(baseline):
        return Check("refusal", "pass", "refusal phrases in both answers")
    return Check("refusal", "fail", f"the candidate says {found[0].group()!r}; the baseline did not refuse",
                 [Evidence("candidate", m.start(), m.end(), "refusal / denial") for m in found])


def _find_all(text: str, term: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(re.escape(term.casefold()), text.casefold())]


def check_terms(candidate: str, baseline: str, terms: list[str] | None, th: Thresholds = DEFAULTS) -> Check:
    """Recall of the probe's expected key terms: the ones the baseline produced must survive."""
    if not terms:
        return Check("terms", "pass", "no expected terms")
    in_cand = [t for t in terms if _find_all(candidate, t)]
    in_base = [t for t in terms if _find_all(baseline, t)]
    lost = [t for t in in_base if t not in in_cand]
    said = f"candidate has {len(in_cand)}/{len(terms)} terms, baseline {len(in_base)}/{len(terms)}"
    if not lost:
        return Check("terms", "pass", said)
    drop = (len(in_base) - len(in_cand)) / len(terms)
    verdict = "fail" if drop >= th.terms_fail_drop else "warn"
    evidence = [Evidence("baseline", s, e, "term missing from the candidate") for t in lost for s, e in
                _find_all(baseline, t)]
    return Check("terms", verdict, f"{said}; lost {', '.join(map(repr, lost))}", evidence)


def check_kl(kl: list[float], top1: float | None = None, spans: list[tuple[int, int]] | None = None,
             th: Thresholds = DEFAULTS) -> Check:
    """Mean KL(baseline || candidate) of next-token distributions along the baseline's answer
    (teacher-forced), with the answer tokens where it is largest as evidence (`spans` are the
    character spans of the baseline answer's tokens)."""
    if not kl:
        return Check("kl", "pass", "empty baseline answer")
    mean = sum(kl) / len(kl)
    said = f"mean KL {mean:.3f} nats/token over {len(kl)} tokens, max {max(kl):.2f}"
    if top1 is not None:
        said += f", top-1 agreement {top1:.0%}"
    verdict = "fail" if mean >= th.kl_fail else "warn" if mean >= th.kl_warn else "pass"
    evidence = [Evidence("baseline", s, e, f"KL {value:.2f}") for value, (s, e) in zip(kl, spans or [])
                if value >= th.kl_mark and e > s] if verdict != "pass" else []
    return Check("kl", verdict, said, evidence[:50])


def compare(prompt: str, baseline: str, candidate: str, expect: dict | None = None, kl: list[float] | None = None,
            top1: float | None = None, spans: list[tuple[int, int]] | None = None,
            th: Thresholds = DEFAULTS) -> list[Check]:
    """Every check on one pair of answers. `expect` is the probe's: `lang`, `script`, `terms`."""
    expect = expect or {}
    checks = [
        check_language(candidate, baseline, expect.get("lang"), th),
        check_script_mixing(candidate, baseline, prompt, expect.get("script"), th),
        check_length(candidate, baseline, th),
        check_repetition(candidate, baseline, th),
        check_refusal(candidate, baseline, th),
        check_terms(candidate, baseline, expect.get("terms"), th),
    ]
    if kl is not None:
        checks.append(check_kl(kl, top1, spans, th))
    return checks
