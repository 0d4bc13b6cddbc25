"""How much memory a verb needs for a checkpoint, from config.json and the safetensors headers alone.

`moescope inspect MODEL_DIR --for VERB --dtype D --batch-size B --seq-len S --generate G` prints it
before anything is loaded. The arithmetic, with b bytes per value at the dtype, H the hidden size,
E experts and k chosen per token, I the expert width, V the vocabulary, T = B x (S + G) tokens:

- weights: the parameters counted in the headers x b (without --dtype: the bytes on disk).
- KV cache (when tokens are generated: `profile --generate`, `gate`): 2 x attention layers x B x
  (S + G) x KV heads x head size x b. Hybrid models (linear attention, Mamba) keep less.
- activations: inference keeps one decoder layer's at a time: the residual stream, its normed copy
  and the attention output (3 x T x H x b); queries, keys and values (T x (heads + 2 x KV heads) x
  head size x b; SDPA, no S x S scores); the experts' slots, T x k x (3 I + H) x b (gate and up
  projections, their product, the outputs); the router's scores, T x E x 4.
- logits: `profile` keeps the last position's only (B x V x 4); `evaluate`, `sweep` and
  `accuracy` score every position: B x S x V x (b + 8) (the logits, a float32 copy, log-softmax).
- per verb: `evaluate` with a baseline, `gate`, `prune` (its replay) and `sweep` (a pruned copy; for
  `sweep quant` a copy in CPU memory, to restore the weights between plans) hold two models; `quantize`
  works on one layer's experts at a time in float32 (3 x 4 bytes per expert parameter of a layer:
  the weights, their quantised copy, the error); `--saliency` adds one more pass of the experts
  (the slots again, with the hidden states repeated k times: T x k x H x b more).

These are estimates, not measurements: the allocator's slack, the CUDA context (about 0.5 GiB per
GPU) and library workspaces come on top. `--max-memory` caps are for weights; leave room for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from moescope.errors import MoescopeError
from moescope.models.layout import config_sections

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
VERBS = ("profile", "evaluate", "quantize", "sweep", "gate", "prune", "accuracy", "bench")
TWO_MODELS = ("evaluate", "gate", "prune", "sweep")
ALL_POSITIONS = ("evaluate", "sweep", "accuracy", "bench")


@dataclass
class Footprint:
    """Bytes a verb needs, by part (see the module docstring)."""

    verb: str
    dtype: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_json(self) -> dict:
        return {"verb": self.verb, "dtype": self.dtype, "parts": self.parts, "total": self.total}


def format_size(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _config_int(config: dict, *keys: str) -> int | None:
    return next((s[k] for s in config_sections(config) for k in keys if isinstance(s.get(k), int)), None)


def footprint(info: dict, config: dict, verb: str = "profile", dtype: str | None = None, batch: int = 8,
              seq_len: int = 2048, generate: int = 0, saliency: bool = False) -> Footprint:
    """The memory `verb` needs for the checkpoint `inspect_checkpoint` described as `info` (config.json
    as `config`), at `dtype` (None: as stored), `batch` rows of `seq_len` tokens plus `generate` new ones."""
    if verb not in VERBS:
        raise MoescopeError(f"--for {verb}: give one of {', '.join(VERBS)}")
    stored = info["bytes_total"] / max(1, info["params_total"])
    b = BYTES[dtype] if dtype else stored
    hidden = _config_int(config, "hidden_size", "d_model") or 0
    heads = _config_int(config, "num_attention_heads", "n_heads") or 1
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    head_size = _config_int(config, "head_dim") or hidden // heads
    width = _config_int(config, "moe_intermediate_size", "intermediate_size") or 0
    vocab = _config_int(config, "vocab_size") or 0
    layers = info["num_layers"] or len(info["moe_layers"])
    experts = max(info["experts_per_layer"].values())
    k = info["top_k"] or 1
    generated = generate if verb in ("profile", "gate") else 0
    tokens = batch * (seq_len + generated)
    parts = {"weights": int(info["params_total"] * b)}
    if verb in TWO_MODELS:
        parts["second model"] = parts["weights"]
    if generated or verb == "gate":
        parts["KV cache"] = int(2 * layers * tokens * kv_heads * head_size * b)
    slots = tokens * k * (3 * width + hidden) * b
    parts["activations"] = int(3 * tokens * hidden * b + tokens * (heads + 2 * kv_heads) * head_size * b + slots
                               + tokens * experts * 4)
    if saliency and verb == "profile":
        parts["saliency pass"] = int(slots + tokens * k * hidden * b)
    parts["logits"] = int(batch * seq_len * vocab * (b + 8) if verb in ALL_POSITIONS else batch * vocab * 4)
    if verb == "quantize":
        parts["quantiser"] = 3 * 4 * info["params_in_experts"] // max(1, len(info["moe_layers"]))
    return Footprint(verb, dtype or f"stored dtype, {stored:g} bytes per parameter", parts)
