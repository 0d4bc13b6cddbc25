"""The plans moescope writes and reads: which experts to prune or merge, and how many bits each expert gets.

Plain data with JSON in and out (no torch): a plan says how it was made (criterion, profile,
budget) and which model it is for, so every checkpoint made from it can say how it was made.

Prune plan:

    {"format_version": 1, "kind": "prune_plan", "model": {"model_type": ..., "config_hash": ...},
     "top_k": 8, "criterion": "gate-mass", "source": {...},
     "layers": [{"layer": 3, "num_experts": 128, "prune": [5, 17, ...]}, ...]}

Merge plan (group i of a layer becomes expert i of the merged model; each group's weights are the
usage shares of its members, summing to 1, and the first member is the most used):

    {"format_version": 1, "kind": "merge_plan", "model": {...}, "top_k": 8, "method": "hc-smoe",
     "source": {...},                # profile, usage counter, similarity and the calibration it was measured on
     "layers": [{"layer": 3, "num_experts": 128, "groups": [[0, 17], [1], ...],
                 "weights": [[0.7, 0.3], [1.0], ...]}, ...]}

Bit plan:

    {"format_version": 1, "kind": "bit_plan", "model": {"model_type": ..., "config_hash": ...},
     "method": "uniform" | "tiers" | "budget",
     "group_size": 128, "symmetric": true, "scales": "minmax",     # "scales" may be absent: minmax
     "non_expert_bits": 16,          # linear layers outside the routed experts (attention, shared experts)
     "layers": {"<decoder layer index>": [bits of expert 0, bits of expert 1, ...], ...},
     "source": {...}}                # free-form: profile, importance, budget, ... the plan came from

Bits are 2, 3, 4 or 8, or 16 for "leave unquantised"; embeddings, the LM head, norms, routers and
biases are never quantised. Quantisation options (`QuantOptions`) are explained in compress.quant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity
from moescope.output import read_json, write_atomic
from moescope.schema import Count, Maybe, NonEmpty, check

FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
UNQUANTISED = 16
BIT_METHODS = ("uniform", "tiers", "budget")
SCALES = ("minmax", "mse", "mlx")
PRUNE_PLAN_SHAPE = {"top_k": Count(1), "criterion": Maybe(str), "source": Maybe(dict),
                    "layers": NonEmpty([{"layer": Count(0), "num_experts": Count(1), "prune": [Count(0)]}])}


def check_bits(bits: int, what: str = "bits") -> int:
    if bits == 0:
        raise MoescopeError(f"{what} = 0 means pruning the expert: use a prune plan, not a bit plan")
    if bits not in (*SUPPORTED_BITS, UNQUANTISED):
        raise MoescopeError(f"{what} = {bits} is not supported: use one of 2, 3, 4, 8 or 16 (unquantised)")
    return int(bits)


def is_count(value: Any) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class QuantOptions:
    group_size: int = 128  # inputs sharing one scale (and offset)
    symmetric: bool = True
    non_expert_bits: int = UNQUANTISED  # attention, shared experts, dense MLPs
    scales: str = "minmax"  # "mse": search each group's clipping range; "mlx": MLX's affine rule

    def __post_init__(self) -> None:
        if not is_count(self.group_size) or self.group_size < 1:
            raise MoescopeError(f"group size must be a positive integer, not {self.group_size!r}")
        if self.scales not in SCALES:
            raise MoescopeError(f"scales must be one of {', '.join(SCALES)}, not {self.scales!r}")
        if self.scales == "mlx" and self.symmetric:
            raise MoescopeError("scales \"mlx\" (MLX's affine rule) keeps an offset per group: it needs "
                                "asymmetric quantisation (--asymmetric; in a plan, \"symmetric\": false)")
        check_bits(self.non_expert_bits, "non_expert_bits")


# ---------------------------------------------------------------- prune and merge plans


class ExpertPlan:
    """What prune plans and merge plans share: the JSON envelope (format, kind, model, top-k), parsing
    with one-line errors, saving and loading, and the check that a plan meets the model it was made on.
    Subclasses are dataclasses with `model`, `num_experts` and `top_k` fields."""

    kind = ""  # the JSON `kind`
    made_by = ""  # the command that writes such a plan

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelIdentity):
            self.model = ModelIdentity.from_dict(self.model)

    @property
    def what(self) -> str:
        return self.kind.replace("_", " ")

    def envelope(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": self.kind, "model": self.model.to_dict(), "top_k": self.top_k}

    @classmethod
    def from_json(cls, data: Any, where: str = "plan"):
        what = cls.kind.replace("_", " ")
        if not isinstance(data, dict) or data.get("kind") != cls.kind or data.get("format_version") != 1:
            raise MoescopeError(f"{where} is not a moescope {what} (format_version 1)")
        cls.check_shape(data, where)
        try:
            plan = cls.parse(data, data["layers"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise MoescopeError(f"{where} is malformed ({error!r}); regenerate it with `{cls.made_by}`") from None
        plan.validate(where)
        return plan

    @classmethod
    def check_shape(cls, data: dict, where: str) -> None:
        """Refuse JSON of the wrong shape before it is parsed (the subclass says what its shape is)."""

    @staticmethod
    def common_fields(data: dict, layers: list) -> dict:
        """The fields every plan reads from its JSON: model, top-k, source, the expert count of each layer."""
        return {"model": ModelIdentity.from_dict(data.get("model")), "top_k": data["top_k"],
                "source": dict(data.get("source") or {}), "num_experts": {e["layer"]: e["num_experts"] for e in layers}}

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_json(read_json(path, cls.kind.replace("_", " ")), where=str(path))

    def check_model(self, model: ModelIdentity, experts_per_layer: dict[int, int], top_k: int) -> None:
        """Refuse a plan recorded for another model: identity, MoE layers and expert counts, top-k."""
        self.model.require(model, self.what)
        if experts_per_layer != self.num_experts:
            raise MoescopeError(f"the {self.what} is for another model: its MoE layers and expert counts "
                                f"{self.num_experts} differ from this model's {experts_per_layer}")
        if self.top_k != top_k:
            raise MoescopeError(f"the {self.what} says top-k {self.top_k}, the model routes to {top_k}: make the plan "
                                "from a profile of this model")


@dataclass
class PrunePlan(ExpertPlan):
    """Experts to prune per MoE layer, and where that choice came from."""

    kind = "prune_plan"
    made_by = "moescope plan prune"

    model: ModelIdentity
    num_experts: dict[int, int]  # MoE layer index -> experts in the source model
    top_k: int
    prune: dict[int, list[int]]  # MoE layer index -> experts to prune
    criterion: str = "manual"
    source: dict = field(default_factory=dict)  # profile path and hash, budget, protected domains

    def to_json(self) -> dict:
        layers = [{"layer": layer, "num_experts": self.num_experts[layer], "prune": sorted(self.prune.get(layer, []))}
                  for layer in sorted(self.num_experts)]
        return {**self.envelope(), "criterion": self.criterion, "source": self.source, "layers": layers}

    @classmethod
    def check_shape(cls, data: dict, where: str) -> None:
        check(data, PRUNE_PLAN_SHAPE, where, "regenerate it with `moescope plan prune`")
        layers = data["layers"]
        if len({e["layer"] for e in layers}) < len(layers):
            raise MoescopeError(f"{where}: a layer is listed twice; regenerate it with `moescope plan prune`")

    @classmethod
    def parse(cls, data: dict, layers: list) -> PrunePlan:
        return cls(**cls.common_fields(data, layers), criterion=str(data.get("criterion") or "manual"),
                   prune={e["layer"]: list(e["prune"]) for e in layers})

    def validate(self, where: str = "prune plan") -> None:
        numbers = [self.top_k, *self.num_experts, *self.num_experts.values(), *sum(self.prune.values(), [])]
        if not all(is_count(n) for n in numbers) or self.top_k < 1 or min(self.num_experts.values(), default=0) < 1:
            raise MoescopeError(f"{where} is malformed: layers, expert counts, experts and top_k must be integers, "
                                "top_k and every expert count at least 1; regenerate it with `moescope plan prune`")

    def experts_fewer(self) -> int:
        """Experts the plan takes away, over all layers."""
        return sum(len(v) for v in self.prune.values())

    def kept(self, layer: int) -> list[int]:
        pruned = set(self.prune.get(layer, []))
        return [e for e in range(self.num_experts[layer]) if e not in pruned]

    def check(self, model: ModelIdentity, experts_per_layer: dict[int, int], top_k: int) -> None:
        """Refuse a plan made for another model, or one that leaves a layer fewer than top-k experts."""
        self.check_model(model, experts_per_layer, top_k)
        for layer, pruned in self.prune.items():
            if any(not 0 <= e < self.num_experts[layer] for e in pruned):
                raise MoescopeError(f"the plan prunes an expert outside 0..{self.num_experts[layer] - 1} "
                                    f"in layer {layer}")
            if len(self.kept(layer)) < self.top_k:
                raise MoescopeError(f"the plan leaves layer {layer} with {len(self.kept(layer))} experts, fewer than "
                                    f"top-k = {self.top_k}: prune fewer experts")


@dataclass
class MergePlan(ExpertPlan):
    """Groups of experts to fold into one per MoE layer (group i becomes expert i), with the share
    of each member in its group's weighted average, and where the grouping came from."""

    kind = "merge_plan"
    made_by = "moescope plan merge"

    model: ModelIdentity
    num_experts: dict[int, int]  # MoE layer index -> experts in the source model
    top_k: int
    groups: dict[int, list[list[int]]]  # MoE layer index -> groups of source experts
    weights: dict[int, list[list[float]]]  # the same shape: each member's share of its group (sums to 1)
    method: str = "manual"
    source: dict = field(default_factory=dict)  # profile, usage counter, similarity, calibration

    def to_json(self) -> dict:
        layers = [{"layer": layer, "num_experts": self.num_experts[layer],
                   "groups": [list(g) for g in self.groups[layer]], "weights": [list(w) for w in self.weights[layer]]}
                  for layer in sorted(self.num_experts)]
        return {**self.envelope(), "method": self.method, "source": self.source, "layers": layers}

    @classmethod
    def parse(cls, data: dict, layers: list) -> MergePlan:
        return cls(**cls.common_fields(data, layers), method=str(data.get("method", "manual")),
                   groups={e["layer"]: [list(g) for g in e["groups"]] for e in layers},
                   weights={e["layer"]: [[float(w) for w in g] for g in e["weights"]] for e in layers})

    def validate(self, where: str = "merge plan") -> None:
        """Every layer's groups split its experts exactly once, with one non-negative share per member
        summing to 1 in each group."""
        numbers = [self.top_k, *self.num_experts, *self.num_experts.values(),
                   *(e for groups in self.groups.values() for g in groups for e in g)]
        if not all(is_count(n) for n in numbers) or self.top_k < 1:
            raise MoescopeError(f"{where} is malformed: layers, expert counts and experts must be integers, "
                                "top_k at least 1; regenerate it with `moescope plan merge`")
        for layer, count in self.num_experts.items():
            groups, weights = self.groups.get(layer, []), self.weights.get(layer, [])
            members = sorted(e for g in groups for e in g)
            if members != list(range(count)) or any(not g for g in groups):
                raise MoescopeError(f"{where}: the groups of layer {layer} must hold each of its experts "
                                    f"0..{count - 1} exactly once")
            shapes_agree = [len(w) for w in weights] == [len(g) for g in groups]
            if not shapes_agree or any(not all(x >= 0 for x in w) or abs(sum(w) - 1) > 1e-6 for w in weights):
                raise MoescopeError(f"{where}: the weights of layer {layer} must give each member of each group a "
                                    "share >= 0, the shares of a group summing to 1")

    def experts_fewer(self) -> int:
        """Experts the plan takes away, over all layers."""
        return sum(len(g) - 1 for groups in self.groups.values() for g in groups)

    def merged_count(self, layer: int) -> int:
        return len(self.groups[layer])

    def targets(self, layer: int) -> list[int]:
        """The merged expert each source expert of `layer` folds into."""
        new = [0] * self.num_experts[layer]
        for index, group in enumerate(self.groups[layer]):
            for expert in group:
                new[expert] = index
        return new

    def check(self, model: ModelIdentity, experts_per_layer: dict[int, int], top_k: int) -> None:
        """Refuse a plan made for another model, or one that leaves a layer fewer experts than top-k."""
        self.check_model(model, experts_per_layer, top_k)
        for layer in self.num_experts:
            if self.merged_count(layer) < self.top_k:
                raise MoescopeError(f"the merge plan leaves layer {layer} with {self.merged_count(layer)} experts, "
                                    f"fewer than top-k = {self.top_k}: merge fewer experts")


def load_plan(path: str | Path) -> PrunePlan | MergePlan:
    """A prune plan or a merge plan, by the `kind` the file states."""
    data = read_json(path, "plan")
    if isinstance(data, dict) and data.get("kind") == "merge_plan":
        return MergePlan.from_json(data, where=str(path))
    return PrunePlan.from_json(data, where=str(path))


# ---------------------------------------------------------------- bit plans


@dataclass
class BitPlan:
    """Bits per expert for every MoE layer (decoder layer index -> one entry per expert)."""

    layers: dict[int, list[int]]
    model: ModelIdentity = field(default_factory=ModelIdentity)
    method: str = "uniform"
    group_size: int = 128
    symmetric: bool = True
    non_expert_bits: int = UNQUANTISED
    source: dict[str, Any] = field(default_factory=dict)
    scales: str = "minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelIdentity):
            self.model = ModelIdentity.from_dict(self.model)

    @classmethod
    def made_with(cls, options: QuantOptions, layers: dict[int, list[int]], model: ModelIdentity, method: str,
                  source: dict[str, Any]) -> BitPlan:
        """A plan that quantises as `options` say."""
        return cls(layers, model, method, options.group_size, options.symmetric, options.non_expert_bits, source,
                   options.scales)

    @property
    def options(self) -> QuantOptions:
        return QuantOptions(self.group_size, self.symmetric, self.non_expert_bits, self.scales)

    def average_bits(self) -> float:
        """Mean bits over all experts (the experts of a model are the same size)."""
        bits = [b for layer in self.layers.values() for b in layer]
        return sum(bits) / len(bits)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": "bit_plan", "model": self.model.to_dict(),
                "method": self.method, "group_size": self.group_size, "symmetric": self.symmetric,
                "scales": self.scales, "non_expert_bits": self.non_expert_bits,
                "layers": {str(i): [int(b) for b in bits] for i, bits in sorted(self.layers.items())},
                "source": self.source}

    @classmethod
    def from_dict(cls, data: Any) -> BitPlan:
        """A plan from its JSON form; MoescopeError on anything that is not a valid bit plan."""
        if not isinstance(data, dict) or data.get("kind") != "bit_plan":
            raise MoescopeError("not a bit plan: expected a JSON object with \"kind\": \"bit_plan\"")
        if data.get("format_version") != FORMAT_VERSION:
            raise MoescopeError(f"bit plan format_version {data.get('format_version')!r} is not supported "
                                f"(this moescope reads {FORMAT_VERSION})")
        if data.get("method") not in BIT_METHODS:
            raise MoescopeError(f"bit plan method {data.get('method')!r} is not one of {', '.join(BIT_METHODS)}")
        group_size, symmetric = data.get("group_size", 128), data.get("symmetric", True)
        non_expert = data.get("non_expert_bits", UNQUANTISED)
        if not isinstance(symmetric, bool):
            raise MoescopeError(f"bit plan symmetric must be true or false, not {symmetric!r}")
        if not is_count(non_expert):
            raise MoescopeError(f"bit plan non_expert_bits must be an integer, not {non_expert!r}")
        try:  # plans written before the MSE search have no scales: minmax
            options = QuantOptions(group_size, symmetric, non_expert, data.get("scales", "minmax"))
        except MoescopeError as error:
            raise MoescopeError(f"bit plan: {error}") from None
        source = data.get("source") or {}
        if not isinstance(source, dict):
            raise MoescopeError(f"bit plan source must be an object, not {type(source).__name__}")
        return cls(parse_layer_bits(data.get("layers")), ModelIdentity.from_dict(data.get("model")), data["method"],
                   options.group_size, options.symmetric, options.non_expert_bits, source, options.scales)


def parse_layer_bits(layers: Any) -> dict[int, list[int]]:
    """The `layers` object of a bit plan, validated: layer index -> bits of each expert."""
    if not isinstance(layers, dict) or not layers:
        raise MoescopeError("bit plan has no layers: expected {\"<layer index>\": [bits per expert, ...]}")
    parsed = {}
    for key, bits in layers.items():
        if not (key.isascii() and key.isdigit()) or not isinstance(bits, list) or not bits:
            raise MoescopeError(f"bit plan layer {key!r}: expected a layer index and a list of bits per expert")
        for e, b in enumerate(bits):
            if not is_count(b):
                raise MoescopeError(f"bit plan layer {key} expert {e}: bits must be an integer, not {b!r}")
            check_bits(b, f"bit plan layer {key} expert {e}: bits")
        parsed[int(key)] = list(bits)
    return parsed


def bit_plan_text(plan: BitPlan) -> str:
    """The plan as the JSON text a bit plan file holds."""
    return json.dumps(plan.to_dict(), indent=1) + "\n"


def save_bit_plan(plan: BitPlan, path: str | Path) -> None:
    """Write the plan as JSON (to a temporary file first, then renamed: never a half-written plan)."""
    write_atomic(path, bit_plan_text(plan))


def load_bit_plan(path: str | Path) -> BitPlan:
    """Read and validate a bit plan (compress.quant checks it against a model)."""
    try:
        return BitPlan.from_dict(read_json(path, "bit plan"))
    except MoescopeError as error:
        message = str(error)
        raise MoescopeError(message if str(path) in message else f"{path}: {message}") from None
