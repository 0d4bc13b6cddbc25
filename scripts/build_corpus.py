"""Build the demo corpus: real multilingual text from Debian packages, CPython source, generated tasks.

Run once, by hand (not part of set-up). Everything raw lands under ``data/`` (gitignored):

    python scripts/build_corpus.py            # download .debs with apt-get, extract, clean, split
    python scripts/build_corpus.py --prompts  # only rebuild calibration and probe sets from the pool

Outputs:

- ``data/corpus/train/<domain>-<lang>.txt``: training text, documents separated by a blank line + 0x1e.
- ``moescope/assets/heldout/<domain>-<lang>.jsonl``: held-out evaluation chunks (calibration format).
- ``data/corpus/pool/<domain>-<lang>.jsonl``: chunks reserved for calibration and probe prompts.
- ``data/corpus/stats.json``: characters and chunks per source and split (for DATASHEET.md).

Splits are made per chunk (about 1,500 characters of whole paragraphs, or one generated task) by a
SHA-1 of the chunk text, after exact de-duplication of paragraphs across all sources, so no chunk
is in two splits. Why: deterministic, needs no state, and is independent of file order.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import inspect
import json
import random
import re
import subprocess
import sys
import sysconfig
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
RAW = DATA / "raw"
OUT = DATA / "corpus"
HELDOUT = ROOT / "moescope" / "assets" / "heldout"
SEP = "\n\x1e\n"  # document separator inside train files

LANGS = ["en", "de", "fr", "es", "it", "ru", "zh", "ja"]
PACKAGES = [
    "debian-reference-en", "debian-reference-de", "debian-reference-es", "debian-reference-fr",
    "debian-reference-it", "debian-reference-ja", "debian-reference-zh-cn", "debian-reference-common",
    "debian-faq", "debian-faq-de", "debian-faq-fr", "debian-faq-ru", "debian-faq-ja", "debian-faq-zh-cn",
    "debian-faq-it", "manpages-de", "manpages-fr", "manpages-es", "manpages-ru", "manpages-ja",
    "manpages-it", "fortunes-de", "fortunes-es", "fortunes-ru", "fortunes-it", "fortunes-zh", "fortunes-min",
    "fortunes", "jargon-text", "python3.11-doc",
]
HELDOUT_CHARS = 160_000  # per (domain, lang): >= 128 x 256 tokens for every domain
POOL_CHUNKS = 40  # per (domain, lang): reserved for calibration and probe prompts

STOP = {
    "en": "the of and to is in that it for are with as this be on not you can by or",
    "de": "der die und das ist nicht ein eine zu den mit sich von für auf dem werden wird sie",
    "fr": "le la les de des et est un une pour que dans qui pas sur vous avec par sont",
    "es": "el la los las de del y es un una para que en por con se no su como",
    "it": "il la le di che e è un una per del della non con sono si gli da",
}


def fetch_debs() -> None:
    """Download the Debian packages (about 30 MB) and extract them under data/raw (no install)."""
    debs = DATA / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob("*.deb")):
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    if not RAW.exists():
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(RAW)], check=True)


# ---------------------------------------------------------------- cleaning and language checks

def strip_html(text: str) -> str:
    """Turn a DocBook HTML page into paragraphs of plain text."""
    text = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", " ", text)
    text = re.sub(r"(?i)</?(p|div|h\d|li|tr|pre|table|dt|dd|br|blockquote)\b[^>]*>", "\n\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


def strip_roff(text: str) -> str:
    """Turn a man page source into paragraphs of plain text (good enough for language modelling)."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"")) or line.startswith((".ig", ".de", ".TH", ".so")):
            continue
        if re.match(r"^\.(PP|P|LP|SH|SS|TP|IP|sp|br|RS|RE|HP|nf|fi|in|EX|EE)\b", line):
            out.append("")
            line = re.sub(r"^\.\w+\s*", "", line)
        elif line.startswith("."):
            line = re.sub(r"^\.\w+\s*", "", line).replace('"', "")
        line = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", line)
        line = re.sub(r"\\[/,&]", "", line).replace("\\-", "-").replace("\\(em", "—").replace("\\e", "\\")
        line = re.sub(r"\\\(..|\\\*\(..|\\\*.|\\.", "", line)
        out.append(line)
    return "\n\n".join(" ".join(p.split()) for p in "\n".join(out).split("\n\n"))


def script_share(text: str, lo: int, hi: int) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(lo <= ord(c) <= hi for c in letters) / max(1, len(letters))


def is_lang(par: str, lang: str) -> bool:
    """Cheap language check: right script for ru/zh/ja, more own than English stop words for Latin."""
    if lang == "ru":
        return script_share(par, 0x0400, 0x04FF) > 0.5
    if lang in ("zh", "ja"):
        han = script_share(par, 0x4E00, 0x9FFF)
        kana = script_share(par, 0x3040, 0x30FF)
        return (han + kana > 0.3) and ((kana > 0.05) if lang == "ja" else kana == 0)
    words = re.findall(r"\w+", par.lower())
    if lang == "en":
        return len(words) >= 3 and script_share(par, 0x41, 0x7A) > 0.8
    own = sum(w in STOP[lang].split() for w in words)
    eng = sum(w in STOP["en"].split() for w in words)
    return own >= max(1, eng + 1) or (len(words) < 6 and eng == 0 and own >= 1)


# ---------------------------------------------------------------- real sources

def read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def docs_real() -> Iterator[tuple[str, str, str, str, str]]:
    """Yield (domain, lang, source, doc_name, text) for every real document."""
    share = RAW / "usr/share"
    for page in sorted((share / "doc/debian-reference-en/docs").glob("*.html")):
        m = re.match(r"(\w+)\.([\w-]+)\.html", page.name)
        if m and m.group(1) != "index":
            lang = m.group(2).split("-")[0]
            yield ("general" if lang == "en" else "multilingual", lang, "debian-reference",
                   page.name, strip_html(read(page)))
    for page in sorted((share / "doc/debian/FAQ").glob("debian-faq.*.txt.gz")):
        lang = page.name.split(".")[1].split("-")[0]
        text = re.sub(r"\n(?=\S)", " ", read(page).replace("\n\n", "\0")).replace("\0", "\n\n")
        yield ("general" if lang == "en" else "multilingual", lang, "debian-faq", page.name, text)
    for mdir in sorted((share / "man").glob("*/man*")):
        lang = mdir.parent.name
        if lang in LANGS:
            for page in sorted(mdir.glob("*.gz")):
                yield "multilingual", lang, "manpages-" + lang, page.name, strip_roff(read(page))
    fortunes = [("fortunes-de", "de"), ("fortunes-es", "es"), ("fortunes-it", "it"), ("fortunes-ru", "ru"),
                ("fortunes-zh", "zh"), ("fortunes-min", "en"), ("fortunes", "en")]
    for pkg, lang in fortunes:
        for f in deb_files(pkg):
            if f.is_symlink() or f.suffix in (".dat", ".u8") or not f.is_file():
                continue
            if "games/fortunes" not in str(f):
                continue
            if f.name in ("art", "ascii-art", "ethnic", "men-women", "drugs", "politics"):
                continue
            text = re.sub(r".\x08", "", read(f))  # overstriking
            items = [t.strip() for t in re.split(r"\n%\n", text) if t.strip()]
            yield ("general" if lang == "en" else "multilingual", lang, pkg, f.name, "\n\n".join(items))
    jargon = read(share / "doc/jargon-text/jargon.txt.gz")
    yield "general", "en", "jargon-text", "jargon.txt", re.sub(r"\n(?=\S)", " ", jargon)
    rst = share / "doc/python3.11/html/_sources"
    for sub in ("tutorial", "faq", "howto", "reference", "glossary.rst.txt"):
        for page in sorted((rst / sub).rglob("*.txt")) if (rst / sub).is_dir() else [rst / sub]:
            yield "general", "en", "python3.11-doc", page.name, strip_rst(read(page))


def deb_files(pkg: str) -> list[Path]:
    """Files that one downloaded package put under data/raw."""
    deb = next((DATA / "debs").glob(f"{pkg}_*.deb"))
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(listing)) as tar:
        return [RAW / m.name.lstrip("./") for m in tar.getmembers() if m.isfile()]


def strip_rst(text: str) -> str:
    """Drop reStructuredText directives and roles, keep prose and examples."""
    text = re.sub(r"(?m)^\.\. .*$|^\s*:\w+:.*$|^[=\-~^*#]{3,}\s*$", "", text)
    text = re.sub(r":\w+:(?::\w+:)?`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)
    return text.replace("``", "").replace("**", "")


def docs_code() -> Iterator[tuple[str, str, str, str, str]]:
    """CPython standard library source (PSF licence), tests and vendored data excluded."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib).as_posix()
        if re.search(r"(^|/)(test|tests|idle_test|site-packages|lib2to3|pydoc_data|encodings)(/|$)", rel):
            continue
        text = f.read_text("utf-8", errors="replace")
        if len(text) < 200 or len(text) > 400_000:
            continue
        yield "code", "en", "cpython-stdlib", rel, text


# ---------------------------------------------------------------- generated sources

NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Leo",
         "Maya", "Nico", "Olga", "Pavel", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Yuki"]
ITEMS = [("pencil", "pencils"), ("apple", "apples"), ("notebook", "notebooks"), ("ticket", "tickets"),
         ("book", "books"), ("cup of tea", "cups of tea"), ("bus ride", "bus rides"), ("stamp", "stamps")]


def gen_math(rng: random.Random) -> str:
    """One arithmetic or algebra problem with a worked solution."""
    kind = rng.randrange(7)
    if kind == 0:
        a, b, c = rng.randint(10, 999), rng.randint(10, 999), rng.randint(2, 30)
        return (f"Problem: Compute ({a} + {b}) × {c}.\nSolution: First add inside the parentheses: "
                f"{a} + {b} = {a + b}. Then multiply: {a + b} × {c} = {(a + b) * c}.\nAnswer: {(a + b) * c}")
    if kind == 1:
        a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
        c = a * x + b
        sb = f"+ {b}" if b >= 0 else f"- {-b}"
        return (f"Problem: Solve {a}x {sb} = {c}.\nSolution: Subtract {b} from both sides: {a}x = {c - b}. "
                f"Divide both sides by {a}: x = {x}. Check: {a} × {x} {sb} = {c}.\nAnswer: x = {x}")
    if kind == 2:
        who, (one, many) = rng.choice(NAMES), rng.choice(ITEMS)
        p, n = rng.randint(2, 15), rng.randint(2, 12)
        pay = (p * n // 10 + 1 + rng.randint(0, 3)) * 10
        return (f"Problem: One {one} costs {p} euros. {who} buys {n} {many} and pays with {pay} euros. "
                f"How much change does {who} get?\nSolution: The {many} cost {n} × {p} = {p * n} euros. "
                f"The change is {pay} - {p * n} = {pay - p * n} euros.\nAnswer: {pay - p * n} euros")
    if kind == 3:
        base, pct = rng.randint(2, 90) * 10, rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
        v = base * pct // 100
        return (f"Problem: What is {pct}% of {base}?\nSolution: {pct}% means {pct}/100. "
                f"{base} × {pct} / 100 = {base * pct} / 100 = {v}.\nAnswer: {v}")
    if kind == 4:
        a, b, c, d = (rng.randint(1, 9) for _ in range(4))
        num, den = a * d + c * b, b * d
        g = __import__("math").gcd(num, den)
        return (f"Problem: Add the fractions {a}/{b} + {c}/{d}.\nSolution: Use the common denominator "
                f"{b} × {d} = {den}: {a}/{b} = {a * d}/{den} and {c}/{d} = {c * b}/{den}. "
                f"The sum is {num}/{den}, which simplifies by {g} to {num // g}/{den // g}.\n"
                f"Answer: {num // g}/{den // g}")
    if kind == 5:
        r, s = rng.randint(-9, 9), rng.randint(-9, 9)
        b, c = -(r + s), r * s
        sb, sc = "+" if b >= 0 else "-", "+" if c >= 0 else "-"
        return (f"Problem: Solve x^2 {sb} {abs(b)}x {sc} {abs(c)} = 0.\n"
                f"Solution: Look for two numbers with product {c} and sum {-b}: they are {r} and {s}. "
                f"So (x - {r})(x - {s}) = 0, and x = {r} or x = {s}.\n"
                f"Answer: x = {min(r, s)} or x = {max(r, s)}")
    xs = [rng.randint(1, 100) for _ in range(rng.randint(3, 7))]
    return (f"Problem: Find the mean of {', '.join(map(str, xs))}.\nSolution: The sum is "
            f"{' + '.join(map(str, xs))} = {sum(xs)}. There are {len(xs)} numbers, so the mean is "
            f"{sum(xs)} / {len(xs)} = {sum(xs) / len(xs):.2f}.\nAnswer: {sum(xs) / len(xs):.2f}")


def gen_reasoning(rng: random.Random) -> str:
    """One logic puzzle (ordering, syllogism, knights and knaves, sequence) with a worked answer."""
    kind = rng.randrange(4)
    if kind == 0:
        people = rng.sample(NAMES, rng.randint(3, 5))
        clues = [(people[i], people[i + 1]) for i in range(len(people) - 1)]
        shown = clues[:]
        rng.shuffle(shown)
        q = rng.choice(["first", "last"])
        ans = people[0] if q == "first" else people[-1]
        text = " ".join(f"{a} finished before {b}." for a, b in shown)
        chain = " before ".join(people)
        return (f"Puzzle: {', '.join(people[:-1])} and {people[-1]} ran a race. {text} Who finished {q}?\n"
                f"Reasoning: Link the clues into one chain: {chain}. Nobody is before {people[0]} "
                f"and nobody is after {people[-1]}.\nAnswer: {ans}")
    if kind == 1:
        kinds = ["cats", "birds", "poets", "robots", "farmers", "violins", "planets", "judges"]
        a, b, c = rng.sample(kinds, 3)
        if rng.random() < 0.5:
            return (f"Puzzle: All {a} are {b}. All {b} are {c}. Are all {a} {c}?\nReasoning: Every one of "
                    f"the {a} is among the {b}, and every one of the {b} is among the {c}, so the {a} are "
                    f"inside the {c}.\nAnswer: yes")
        return (f"Puzzle: All {a} are {b}. Some {b} are {c}. Must some {a} be {c}?\nReasoning: The {b} "
                f"that are {c} could all be outside the {a}, so nothing forces an overlap.\n"
                "Answer: no, not necessarily")
    if kind == 2:
        x, y = rng.sample(NAMES, 2)
        kx = rng.random() < 0.5
        ky = not kx  # x says "y is a knave", which is consistent only if exactly one is a knight
        claim = f"{x} is a knight" if kx else f"{x} is a knave"
        y_says = claim if ky else (f"{x} is a knave" if kx else f"{x} is a knight")
        role = {True: "knight", False: "knave"}
        return (f"Puzzle: Knights always tell the truth and knaves always lie. {x} says: \"{y} is a knave.\" "
                f"{y} says: \"{y_says}.\" What are {x} and {y}?\nReasoning: If {x} were telling the truth, "
                f"{y} would be a knave; if {x} lied, {y} would be a knight, so exactly one of them is a "
                "knight. "
                f"Checking {y}'s statement leaves one consistent case: {x} is a {role[kx]} and {y} is a "
                f"{role[ky]}.\nAnswer: {x} is a {role[kx]}, {y} is a {role[ky]}")
    start, step = rng.randint(1, 20), rng.randint(2, 9)
    if rng.random() < 0.5:
        seq = [start + i * step for i in range(5)]
        return (f"Puzzle: What number comes next: {', '.join(map(str, seq))}, ?\nReasoning: Each number is "
                f"{step} more than the one before, so the next is {seq[-1]} + {step} = {seq[-1] + step}.\n"
                f"Answer: {seq[-1] + step}")
    ratio = rng.randint(2, 4)
    seq = [start * ratio ** i for i in range(5)]
    return (f"Puzzle: What number comes next: {', '.join(map(str, seq))}, ?\nReasoning: Each number is "
            f"{ratio} times the one before, so the next is {seq[-1]} × {ratio} = {seq[-1] * ratio}.\n"
            f"Answer: {seq[-1] * ratio}")


TOOL_MODULES = ["os", "os.path", "shutil", "json", "math", "statistics", "textwrap", "string", "re",
                "datetime", "calendar", "zlib", "base64", "hashlib", "random", "glob", "fnmatch", "html",
                "urllib.parse", "difflib", "heapq", "bisect", "colorsys", "ipaddress", "uuid", "time"]
WORDS = ["report", "draft", "photo", "budget", "notes", "backup", "invoice", "summary", "alpha", "delta"]


def tool_functions() -> list[tuple[str, inspect.Signature, str]]:
    """Real public stdlib functions with an inspectable signature and a one-line docstring."""
    import importlib

    out = []
    for mod in TOOL_MODULES:
        m = importlib.import_module(mod)
        for name in sorted(dir(m)):
            f = getattr(m, name)
            if name.startswith("_") or not callable(f) or inspect.isclass(f):
                continue
            try:
                sig = inspect.signature(f)
            except (TypeError, ValueError):
                continue
            doc = (inspect.getdoc(f) or "").strip().split("\n")[0]
            if doc and len(doc) < 120 and not doc.startswith(name + "("):
                out.append((f"{mod}.{name}", sig, doc))
    return out


def fake_value(pname: str, default: object, rng: random.Random) -> object:
    """A plausible argument value chosen from the parameter's name or default."""
    if isinstance(default, bool):
        return rng.random() < 0.5
    if isinstance(default, int):
        return rng.randint(0, 10)
    if isinstance(default, float):
        return round(rng.uniform(0, 10), 2)
    if any(k in pname for k in ("path", "file", "dir", "src", "dst", "name")):
        user, word = rng.choice(NAMES).lower(), rng.choice(WORDS)
        return f"/home/{user}/{word}{rng.choice(['.txt', '.csv', '', '.json'])}"
    if pname in ("x", "y", "n", "a", "b", "k", "i", "number", "width", "year", "month", "day", "base"):
        return rng.randint(1, 2000 if pname == "year" else 64)
    if pname in ("data", "iterable", "seq", "population", "values", "list"):
        return [rng.randint(1, 99) for _ in range(rng.randint(2, 6))]
    return f"{rng.choice(WORDS)} {rng.choice(WORDS)}"


def chatml(messages: list[dict[str, str]]) -> str:
    """Render messages exactly as the tokenizer's chat template does."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def gen_agent(rng: random.Random, funcs: list[tuple[str, inspect.Signature, str]]) -> list[dict[str, str]]:
    """One tool-use conversation: tool list, user request, JSON tool call, tool result, final answer."""
    tools = rng.sample(funcs, 4)
    name, sig, doc = tools[0]
    args = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty or rng.random() < 0.3:
            args[p.name] = fake_value(p.name, None if p.default is p.empty else p.default, rng)
    rng.shuffle(tools)
    spec = [{"name": n, "description": d, "parameters": [p for p in s.parameters if not p.startswith("*")]}
            for n, s, d in tools]
    arg_txt = ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items()) or "no arguments"
    ask = rng.choice(["Please {d} with {a}.", "Can you {d}? Use {a}.", "I need this: {d} ({a})."])
    result = rng.choice(["ok", "done", json.dumps(rng.choice(WORDS)), str(rng.randint(0, 999)), "null"])
    return [
        {"role": "system", "content": "You can call these tools. Answer with one JSON tool call.\n"
         + json.dumps(spec, ensure_ascii=False)},
        {"role": "user", "content": ask.format(d=doc[0].lower() + doc[1:].rstrip("."), a=arg_txt)},
        {"role": "assistant", "content": json.dumps({"name": name, "arguments": args}, ensure_ascii=False)},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": f"I called {name} and it returned {result}."},
    ]


# ---------------------------------------------------------------- chunking and splitting

def chunks_of(domain: str, lang: str, text: str, seen: set[str], size: int = 1500) -> list[str]:
    """Whole paragraphs (prose) or blank-line blocks (code) packed into chunks of about `size` chars.

    Prose paragraphs already in `seen` are dropped (licence notices, translator credits, boilerplate).
    """
    if domain == "code":
        pars = [p for p in re.split(r"\n\s*\n(?=\S)", text) if p.strip()]
    else:
        pars = []
        for p in text.split("\n\n"):
            p = p.strip()
            key = "p:" + " ".join(p.split())
            if len(p) >= 12 and key not in seen and is_lang(p, lang):
                seen.add(key)
                pars.append(p)
    out, cur = [], ""
    for p in pars:
        if cur and len(cur) + len(p) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return out


def u(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) / 16**12


# ---------------------------------------------------------------- calibration and probe sets

REAL = ["code", "general"]
GENERATED = {"math": gen_math, "reasoning": gen_reasoning}
ASSETS = ROOT / "moescope" / "assets"


def pieces(text: str, limit: int) -> list[str]:
    """Split a pool chunk into two prompts of at most `limit` characters at line boundaries."""
    lines, out, cur = text.split("\n"), [], ""
    for line in lines:
        if cur and len(cur) + len(line) + 1 > min(limit, len(text) // 2 + 1) and len(out) < 1:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line
    out.append(cur)
    return [p.strip()[:limit].strip() for p in out if len(p.strip()) >= 40]


def shared_terms(prompt: str, rest: str, lang: str, n: int = 3) -> list[str]:
    """Words of the prompt that recur in its true continuation: a topic-continuity check for probes."""
    if lang in ("zh", "ja"):
        grams = [prompt[i:i + 2] for i in range(len(prompt) - 1)]
        cands = [g for g in grams if all(0x4E00 <= ord(c) <= 0x9FFF or 0x30A0 <= ord(c) <= 0x30FF for c in g)]
    else:
        cands = [w for w in re.findall(r"\w{5,}", prompt) if not w.isdigit()]
    seen, out = set(), []
    for w in sorted(cands, key=lambda w: (-rest.count(w), -len(w))):
        if w not in seen and rest.count(w) > 0:
            seen.add(w)
            out.append(w)
    return out[:n]


SCRIPTS = {"ru": "Cyrl", "zh": "Hans", "ja": "Jpan"}
LIMITS = {"ru": 450, "zh": 300, "ja": 300}  # characters per prompt, so prompts stay within 256 tokens


def build_prompt_sets() -> None:
    """calibration.jsonl, calibration-english.jsonl and probes.jsonl from the reserved pool chunks.

    Real-text groups: pool chunk i gives two prompts (its halves). calibration.jsonl takes chunks
    0-14 of code and general English (30 prompts each) and chunks 0-4 of every other language (10 each);
    calibration-english.jsonl takes chunks 0-21 (44 prompts each) of the English groups; probes take
    the first half of chunks 30-39 (English) and 30-35 (other languages). Generated domains draw fresh
    items with their own seed, skipping any text that is already in train, held-out or pool.
    """
    pool = {f.stem: [json.loads(line) for line in open(f)] for f in sorted((OUT / "pool").glob("*.jsonl"))}
    used: set[str] = set()
    for f in (OUT / "train").glob("*.txt"):
        if f.stem.split("-")[0] in ("math", "reasoning", "agent"):
            used.update(t.strip() for t in f.read_text().split(SEP))
    for f in HELDOUT.glob("*.jsonl"):
        used.update(json.loads(line).get("text", "") for line in open(f))
    for recs in pool.values():
        used.update(r.get("text", "") for r in recs)
    rng = random.Random(4321)
    funcs = tool_functions()

    def fresh(domain: str) -> dict:
        while True:
            if domain == "agent":
                msgs = gen_agent(rng, funcs)[:3]  # tools, request, call: fits the 256-token context
                key = chatml(msgs)
            else:
                key = GENERATED[domain](rng)
            if key not in used:
                used.add(key)
                return {"messages": msgs} if domain == "agent" else {"text": key}

    def real(group: str, lo: int, hi: int, lang: str) -> list[str]:
        limit = LIMITS.get(lang, 480)
        return [p for r in pool[group][lo:hi] for p in pieces(r["text"], limit)]

    calib, english, probes = [], [], []
    for domain in ("code", "general", "math", "reasoning", "agent"):
        if domain in REAL:
            c, e = real(f"{domain}-en", 0, 15, "en"), real(f"{domain}-en", 0, 22, "en")
        else:
            e = [fresh(domain) for _ in range(44)]
            c = e[:30]
        calib += [(domain, "en", x) for x in c]
        english += [(domain, "en", x) for x in e]
        for i in range(10):
            probes.append((domain, "en", make_probe(domain, "en", pool, i, fresh)))
    for lang in LANGS[1:]:
        calib += [("multilingual", lang, x) for x in real(f"multilingual-{lang}", 0, 5, lang)]
        for i in range(6):
            probes.append(("multilingual", lang, make_probe("multilingual", lang, pool, i, fresh)))
    write_set(ASSETS / "calibration.jsonl", "calib", calib)
    write_set(ASSETS / "calibration-english.jsonl", "calib-en", english)
    write_set(ASSETS / "probes.jsonl", "probe", probes)


def make_probe(domain: str, lang: str, pool: dict, i: int, fresh) -> dict:
    """A prompt plus `expect`: language, script and, where meaningful, key terms of a good answer."""
    expect: dict = {"lang": lang, "script": SCRIPTS.get(lang, "Latn")}
    if domain in ("math", "reasoning"):
        text = fresh(domain)["text"]
        cue = "\nSolution:" if domain == "math" else "\nReasoning:"
        head, answer = text.split(cue)[0], text.rsplit("Answer:", 1)[1].strip()
        expect["terms"] = [answer.removeprefix("x = ").split(" ")[0].rstrip(",")]
        return {"text": head + cue, "expect": expect}
    if domain == "agent":
        msgs = fresh("agent")["messages"]
        expect["terms"] = [json.loads(msgs[2]["content"])["name"]]
        expect["json"] = True
        return {"messages": msgs[:2], "expect": expect}
    text = pool[f"{domain}-{lang}"][30 + i]["text"]
    piece = pieces(text, LIMITS.get(lang, 480))[0]
    cut = len(piece) * 3 // 5
    cut = piece.rfind(" ", 0, cut) if lang not in ("zh", "ja") and piece.rfind(" ", 0, cut) > 0 else cut
    prompt, rest = piece[:cut], piece[cut:] + text[len(piece):]
    terms = shared_terms(prompt, rest, lang)
    if terms:
        expect["terms"] = terms
    return {"text": prompt, "expect": expect}


def write_set(path: Path, prefix: str, rows: list) -> None:
    with open(path, "w") as f:
        for n, (domain, lang, x) in enumerate(rows):
            rec = {"id": f"{prefix}-{domain}-{lang}-{n:03d}", "domain": domain, "lang": lang}
            rec.update(x if isinstance(x, dict) else {"text": x})
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(path.name, len(rows))


def main() -> None:
    if "--prompts" in sys.argv:
        return build_prompt_sets()
    fetch_debs()
    rng = random.Random(1234)
    funcs = tool_functions()
    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)  # -> [(source, chunk)]
    seen: set[str] = set()
    sources: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(domain: str, lang: str, source: str, text: str) -> None:
        for ch in chunks_of(domain, lang, text, seen):
            key = hashlib.sha1(" ".join(ch.split()).encode()).hexdigest()
            if key in seen or len(ch) < 40:
                continue
            seen.add(key)
            groups[domain, lang].append((source, ch))
            sources[source]["chars"] += len(ch)

    for domain, lang, source, _name, text in (*docs_real(), *docs_code()):
        add(domain, lang, source, text)
    for _ in range(30000):
        add("math", "en", "generated-math", gen_math(rng))
    for _ in range(30000):
        add("reasoning", "en", "generated-reasoning", gen_reasoning(rng))
    for _ in range(12000):
        msgs = gen_agent(rng, funcs)
        key = chatml(msgs)
        if key not in seen:
            seen.add(key)
            groups["agent", "en"].append(("generated-agent", json.dumps(msgs, ensure_ascii=False)))
            sources["generated-agent"]["chars"] += len(key)

    for d in (OUT / "train", OUT / "pool", HELDOUT):
        d.mkdir(parents=True, exist_ok=True)
    stats: dict = {"sources": {}, "groups": {}, "tool_functions": len(funcs)}
    for (domain, lang), items in sorted(groups.items()):
        items.sort(key=lambda it: u(it[1]))
        held, pool, train, hchars = [], [], [], 0
        for src, ch in items:
            text = chatml(json.loads(ch)) if domain == "agent" else ch
            if hchars < HELDOUT_CHARS and len(held) < len(items) // 5:
                held.append((src, ch))
                hchars += len(text)
            elif len(pool) < POOL_CHUNKS:
                pool.append((src, ch))
            else:
                train.append(text)
                sources[src]["train_chars"] += len(text)
        name = f"{domain}-{lang}"
        with open(HELDOUT / f"{name}.jsonl", "w") as f:
            for i, (src, ch) in enumerate(held):
                rec = {"id": f"heldout-{name}-{i:04d}", "domain": domain, "lang": lang, "source": src}
                rec.update({"messages": json.loads(ch)} if domain == "agent" else {"text": ch})
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        with open(OUT / "pool" / f"{name}.jsonl", "w") as f:
            for src, ch in pool:
                rec = {"domain": domain, "lang": lang, "source": src}
                rec.update({"messages": json.loads(ch)} if domain == "agent" else {"text": ch})
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        (OUT / "train" / f"{name}.txt").write_text(SEP.join(train))
        stats["groups"][name] = {"chunks": len(items), "heldout_chunks": len(held), "heldout_chars": hchars,
                                 "pool_chunks": len(pool), "train_chunks": len(train),
                                 "train_chars": sum(map(len, train))}
        print(name, stats["groups"][name], flush=True)
    stats["sources"] = {k: dict(v) for k, v in sources.items()}
    (OUT / "stats.json").write_text(json.dumps(stats, indent=1))
    build_prompt_sets()


if __name__ == "__main__":
    sys.exit(main())
