"""`Profile`: the counters a profiling run leaves behind, mergeable by addition.

A profile directory holds `profile.json` (model identity, layers, settings, prompts, summary
counts) and `stats.safetensors` (the counters). Memory is O(layers x experts^2) plus O(layers x
experts) per prompt, never O(tokens).

Counters (axis names in `AXES`; P = phase (prefill, generation), D = domain, G = language,
L = MoE layer in forward order, E = expert, B = histogram bin, N = prompt):

    selections      [P, D, L, E]  int64  times each expert was chosen, by domain
    lang_selections [P, G, L, E]  int64  the same, by language
    tokens          [P, D]        int64  tokens routed (each passes every MoE layer once)
    lang_tokens     [P, G]        int64
    weight_sum      [P, L, E]     fixed  sum of the routing weight an expert got when chosen
    weight_sq       [P, L, E]     fixed  sum of its square
    weight_hist     [P, L, E, B]  int64  histogram of those weights over `HIST_EDGES`
    entropy_sum     [P, L]        fixed  sum over tokens of the entropy of the top-k weights
                                         renormalised to 1 (compare its mean with ln k)
    prompt_tokens   [N, P]        int64  tokens of each prompt
    presence        [N, P, L, E/8] uint8 which experts each prompt touched, bits packed along
                                         experts (numpy `packbits`, little bit order)
    prompt_counts   [N, L, E]     uint32 times each prompt chose each expert, phases added (for the
                                         bootstrap over prompts); optional (`moescope profile` keeps
                                         it unless --no-prompt-counts): 4 bytes per prompt x layer x
                                         expert (150 x 60 x 512: 18 MB)
    coactivation    [P, L, E, E]  int64  tokens choosing both experts (diagonal = selections); optional
    saliency_sum    [P, L, E]     fixed  sum of weight x L2 norm of the expert's output (REAP); optional

A profile ingested from a serving engine's dump (profiling.ingest) lacks what the dump does not
carry, e.g. the routing weights: `Profile.absent` names each missing counter and why, and readers
that need one say so instead of guessing. Profiles without the `absent` entry (all earlier ones)
have every counter that is not OPTIONAL.

"fixed" counters are int64 in units of 2^-24: each value is rounded once, then added as an
integer, so adding profiles is exact and order-independent (float sums are not). Read them as
floats with `Profile.real(name)`. The capacity is 2^39 (5e11) units of weight per expert.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moescope import __version__
from moescope.calibration import set_hash
from moescope.checkpoints import read_header
from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity
from moescope.output import OutputKind, read_json, write_atomic
from moescope.schema import Count, NonEmpty, check

FORMAT_VERSION = 1
PHASES = ("prefill", "generation")
FIXED_SCALE = 2**24
# Histogram bins: bin 0 is [0, 1e-6) (and anything lower), bins 1..64 are log-spaced with 8 per
# decade from 1e-6 to 1e2, bin 65 is [1e2, inf). Weights can exceed 1 (DeepSeek-V3 scales by 2.5).
# Weights are binned in float32 against these edges cast to float32.
HIST_EDGES = np.logspace(-6, 2, 65)
HIST_BINS = len(HIST_EDGES) + 1
AXES: dict[str, tuple[str, ...]] = {
    "selections": ("phase", "domain", "layer", "expert"),
    "lang_selections": ("phase", "lang", "layer", "expert"),
    "tokens": ("phase", "domain"),
    "lang_tokens": ("phase", "lang"),
    "weight_sum": ("phase", "layer", "expert"),
    "weight_sq": ("phase", "layer", "expert"),
    "weight_hist": ("phase", "layer", "expert", "bin"),
    "entropy_sum": ("phase", "layer"),
    "prompt_tokens": ("prompt", "phase"),
    "presence": ("prompt", "phase", "layer", "expert_bytes"),
    "prompt_counts": ("prompt", "layer", "expert"),
    "coactivation": ("phase", "layer", "expert", "expert"),
    "saliency_sum": ("phase", "layer", "expert"),
}
FIXED = ("weight_sum", "weight_sq", "entropy_sum", "saliency_sum")
OPTIONAL = ("coactivation", "saliency_sum", "prompt_counts")
DTYPES = {"presence": np.uint8, "prompt_counts": np.uint32}  # the rest are int64
STATS_FILE, META_FILE = "stats.safetensors", "profile.json"
PROFILE = OutputKind("profile", directory=True, is_own=lambda path: (path / META_FILE).is_file())
# What profile.json must hold for the code that reads it (model identity: ModelIdentity.from_dict).
META_SHAPE = {
    "format_version": int, "model": dict, "settings": dict, "domains": [str], "langs": [str],
    "layers": NonEmpty([{"layer": Count(0), "num_experts": Count(1), "top_k": Count(1)}]),
    "prompts": [{"id": str, "domain": str, "lang": str, "hash": str}],
    "counters": dict,
}


@dataclass
class Profile:
    """Counters of one or more profiling runs over one model. See the module docstring."""

    model: ModelIdentity  # model_type, config_hash, source (the directory it was loaded from)
    layers: list[dict]  # MoELayer.describe() of each MoE layer, in forward order
    settings: dict  # what must match for profiles to add up: dtype, generate, max_tokens
    domains: list[str]
    langs: list[str]
    prompts: list[dict] = field(default_factory=list)  # id, domain, lang, hash, truncated
    counters: dict[str, np.ndarray] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)  # counter -> why the source could not record it

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelIdentity):
            self.model = ModelIdentity.from_dict(self.model)

    @classmethod
    def empty(cls, model: ModelIdentity, layers: list[dict], settings: dict, domains: list[str], langs: list[str],
              coactivation: bool = False, saliency: bool = False, prompt_counts: bool = False,
              absent: dict[str, str] | None = None) -> Profile:
        """A profile with every counter at zero and no prompts; `absent` counters (name -> why) are left out."""
        profile = cls(model, layers, settings, sorted(domains), sorted(langs), absent=dict(absent or {}))
        wanted = {"coactivation": coactivation, "saliency_sum": saliency, "prompt_counts": prompt_counts}
        for name in AXES:
            if name not in profile.absent and (name not in OPTIONAL or wanted[name]):
                profile.counters[name] = np.zeros(profile.shape(name, prompts=0), DTYPES.get(name, np.int64))
        return profile

    @property
    def num_experts(self) -> int:
        """Width of the expert axis: the largest expert count of any layer."""
        return max(layer["num_experts"] for layer in self.layers)

    @property
    def calibration_hash(self) -> str:
        """Order-independent hash of the prompts counted (merged shards hash like the whole set)."""
        return set_hash([p["hash"] for p in self.prompts])

    def shape(self, name: str, prompts: int | None = None) -> tuple[int, ...]:
        sizes = {"phase": len(PHASES), "domain": len(self.domains), "lang": len(self.langs),
                 "layer": len(self.layers), "expert": self.num_experts, "bin": HIST_BINS,
                 "expert_bytes": (self.num_experts + 7) // 8,
                 "prompt": len(self.prompts) if prompts is None else prompts}
        return tuple(sizes[axis] for axis in AXES[name])

    def lacks(self, name: str, needed_for: str) -> str | None:
        """One line saying that `needed_for` cannot be shown because counter `name` is absent; None if present."""
        if name in self.counters:
            return None
        why = self.absent.get(name, "not recorded")
        return f"{needed_for}: needs {name}, which this profile lacks ({why})"

    def real(self, name: str) -> np.ndarray:
        """A fixed-point counter (one of FIXED) as float64."""
        if name in self.absent:
            raise MoescopeError(self.lacks(name, f"reading {name}"))
        if name not in FIXED:
            raise ValueError(f"{name} is not a fixed-point counter; read it from .counters")
        return self.counters[name] / FIXED_SCALE

    def presence_of(self, prompt: int) -> np.ndarray:
        """bool [P, L, E]: the experts prompt number `prompt` touched, per phase and layer."""
        bits = np.unpackbits(self.counters["presence"][prompt], axis=-1, bitorder="little")
        return bits[..., : self.num_experts].astype(bool)

    def check(self) -> None:
        """Every token chose exactly top-k experts in every layer: selections = tokens x top-k; the
        per-prompt counts, when kept, add up to the selections."""
        selections = self.counters["selections"].sum(axis=(1, 3))  # [P, L]
        tokens = self.counters["tokens"].sum(axis=1)
        for p, phase in enumerate(PHASES):
            for i, layer in enumerate(self.layers):
                if selections[p, i] != tokens[p] * layer["top_k"]:
                    raise MoescopeError(
                        f"inconsistent counters: layer {layer['layer']} ({phase}) has {selections[p, i]} "
                        f"selections for {tokens[p]} tokens x top-k {layer['top_k']}; routing events were "
                        "missed or double-counted, please report this with the model's config.json")
        if "prompt_counts" in self.counters and not np.array_equal(
                self.counters["prompt_counts"].sum(0, dtype=np.int64), self.counters["selections"].sum((0, 1))):
            raise MoescopeError("inconsistent counters: the per-prompt selection counts do not add up to the "
                                "selections; the profile is corrupt, profile again")

    def check_labels(self, where: str) -> None:
        """Refuse layers, domains, languages and prompts that contradict each other (a hand-edited profile)."""
        problems = [
            (len({x["layer"] for x in self.layers}) < len(self.layers), "a layer is listed twice"),
            (any(x["top_k"] > x["num_experts"] for x in self.layers), "a layer's top_k exceeds its expert count"),
            (len(set(self.domains)) < len(self.domains) or len(set(self.langs)) < len(self.langs),
             "a domain or language is listed twice"),
            (any(p["domain"] not in self.domains or p["lang"] not in self.langs for p in self.prompts),
             "a prompt's domain or language is not in the lists of domains and languages"),
        ]
        for found, problem in problems:
            if found:
                raise MoescopeError(f"{where}: {problem}; profile again")

    def summary(self) -> dict:
        """Human-readable counts for profile.json."""
        tokens = self.counters["tokens"]
        return {
            "prompts": len(self.prompts),
            "tokens": {phase: int(tokens[p].sum()) for p, phase in enumerate(PHASES)},
            "tokens_by_domain": {phase: dict(zip(self.domains, map(int, tokens[p]), strict=True))
                                 for p, phase in enumerate(PHASES)},
            "prompts_by_domain": {d: sum(p["domain"] == d for p in self.prompts) for d in self.domains},
            "prompts_by_lang": {g: sum(p["lang"] == g for p in self.prompts) for g in self.langs},
        }

    def merge(self, other: Profile) -> Profile:
        """A new profile with both profiles' counters added; refuses profiles that don't add up."""
        differs = self.model.mismatch(other.model)
        if differs:
            raise MoescopeError(f"cannot merge profiles of different models: {differs}")
        if self.layers != other.layers:
            diff = next((a, b) for a, b in zip(self.layers, other.layers, strict=False) if a != b) \
                if len(self.layers) == len(other.layers) else (len(self.layers), len(other.layers))
            raise MoescopeError(f"cannot merge profiles with different MoE layers: {diff[0]} vs {diff[1]}")
        for key in sorted(set(self.settings) | set(other.settings)):
            if self.settings.get(key) != other.settings.get(key):
                raise MoescopeError(f"cannot merge profiles made with different settings: {key} "
                                    f"{self.settings.get(key)} vs {other.settings.get(key)}")
        if set(self.counters) != set(other.counters):
            extra = sorted(set(self.counters) ^ set(other.counters))
            raise MoescopeError(f"cannot merge: only one profile has {', '.join(extra)}; profile both alike")
        ids = {p["id"] for p in self.prompts}
        twice = [p["id"] for p in other.prompts if p["id"] in ids]
        if twice:
            raise MoescopeError(f"cannot merge: prompt {twice[0]!r} is in both profiles and would count twice")
        domains, langs = sorted(set(self.domains) | set(other.domains)), sorted(set(self.langs) | set(other.langs))
        merged = Profile(self.model, self.layers, dict(self.settings), domains, langs,
                         self.prompts + other.prompts, absent={**other.absent, **self.absent})
        for name in self.counters:
            a, b = (p._aligned(name, domains, langs) for p in (self, other))
            merged.counters[name] = np.concatenate([a, b]) if AXES[name][0] == "prompt" else a + b
        return merged

    def _aligned(self, name: str, domains: list[str], langs: list[str]) -> np.ndarray:
        """Counter `name` with its domain/language axis laid out as `domains` / `langs`."""
        array = self.counters[name]
        layouts = {"domain": (self.domains, domains), "lang": (self.langs, langs)}
        for axis, label in enumerate(AXES[name]):
            own, target = layouts.get(label, (None, None))
            if own is None or own == target:
                continue
            shape = list(array.shape)
            shape[axis] = len(target)
            wide = np.zeros(shape, array.dtype)
            index = [slice(None)] * array.ndim
            index[axis] = [target.index(n) for n in own]
            wide[tuple(index)] = array
            array = wide
        return array

    def save(self, directory: str | Path) -> None:
        """Write profile.json and stats.safetensors into `directory` (created if needed)."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "model": self.model.to_dict(source=True),
            "layers": self.layers,
            "settings": self.settings,
            "calibration_hash": self.calibration_hash,
            "domains": self.domains,
            "langs": self.langs,
            "counts": self.summary(),
            "counters": {name: list(AXES[name]) for name in self.counters},
            "fixed_point_scale": FIXED_SCALE,
            "hist_edges": HIST_EDGES.tolist(),
            "prompts": self.prompts,
            "absent": self.absent,
        }
        save_file({k: np.ascontiguousarray(v) for k, v in self.counters.items()}, str(directory / STATS_FILE))
        write_atomic(directory / META_FILE, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Profile:
        """Read a profile directory; a missing, foreign or corrupt file is a MoescopeError."""
        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise MoescopeError(f"{directory} is not a profile (no {META_FILE}); make one with `moescope profile`")
        meta = read_json(directory / META_FILE, "profile")
        if isinstance(meta, dict) and meta.get("format_version") != FORMAT_VERSION:
            raise MoescopeError(f"{directory} has profile format {meta.get('format_version')!r}; this moescope "
                                f"reads format {FORMAT_VERSION}")
        check(meta, META_SHAPE, str(directory / META_FILE), "profile again")
        absent = meta.get("absent") or {}
        if not isinstance(absent, dict) or any(name not in AXES or not isinstance(why, str)
                                               for name, why in absent.items()):
            raise MoescopeError(f"{directory / META_FILE} is corrupt: 'absent' must map counter names to reasons")
        model = ModelIdentity.from_dict(meta["model"], str(directory / META_FILE))
        profile = cls(model, meta["layers"], meta["settings"], meta["domains"], meta["langs"], meta["prompts"],
                      absent=absent)
        profile.check_labels(str(directory / META_FILE))
        profile.counters = load_counters(directory / STATS_FILE, profile, set(meta["counters"]))
        profile.check()
        return profile


def load_counters(path: Path, profile: Profile, expected: set[str]) -> dict[str, np.ndarray]:
    """The counters in stats.safetensors, each checked against its name, dtype and the profile's shape."""
    from safetensors.numpy import load_file

    if not path.is_file():
        raise MoescopeError(f"{path} is missing; profile again")
    read_header(path, "profile again")  # a crafted or truncated header: a clear error before safetensors reads it
    try:
        counters = load_file(str(path))
    except Exception as error:  # safetensors raises several types for truncated or garbled files
        raise MoescopeError(f"{path} is corrupt ({error}); profile again") from None
    required = {name for name in AXES if name not in OPTIONAL and name not in profile.absent}
    for name in expected | set(counters) | required:
        array = counters.get(name)
        if (name not in expected or array is None or name not in AXES or array.dtype != DTYPES.get(name, np.int64)
                or array.shape != profile.shape(name)):
            raise MoescopeError(f"{path} is corrupt: counter {name!r} is missing or unexpected, or has the wrong shape "
                                "or type; profile again")
    return counters
def merge_all(profiles: Iterable[Profile]) -> Profile:
    """Add profiles in the order given, neighbours first (as a binary counter does): prompts keep their
    order, each is copied about log2(n) times, and at most about log2(n) partial sums are held at once,
    so a stream of shards or chunks merges in memory close to the result's."""
    stack: list[tuple[int, Profile]] = []  # (how many profiles it adds up, their sum), sizes falling
    for profile in profiles:
        size = 1
        while stack and stack[-1][0] == size:
            below, total = stack.pop()
            profile, size = total.merge(profile), size + below
        stack.append((size, profile))
    if not stack:
        raise MoescopeError("nothing to merge")
    total = stack.pop()[1]
    while stack:
        total = stack.pop()[1].merge(total)
    return total
