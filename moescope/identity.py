"""Which model a profile or plan was made on, and the one check that it meets the right model.

A profile, prune plan or bit plan records the model's `model_type` and a hash of its config; every
place where such a file meets a model (or another profile) compares both, so a plan from another
model of the same type and shape is refused instead of silently applied.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from moescope.errors import MoescopeError

# Config keys that change with how a model is loaded or saved, not with the model itself.
VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
    "_attn_implementation_autoset", "use_cache", "output_router_logits",
})
KEYS = ("model_type", "config_hash")


def config_hash(config: dict) -> str:
    """Hash of a model config (as a dict) without the keys that change with loading, not with the model."""
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """The model a file was made on: its (text) model type, config hash, and where it was loaded from."""

    model_type: str | None = None
    config_hash: str | None = None
    source: str = ""

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> ModelIdentity:
        """From the `model` object of a profile or plan (read from the file `where`); MoescopeError if it
        is not one."""
        if data is None:
            return cls()
        if not isinstance(data, dict) or any(not isinstance(data.get(k), str | None) for k in (*KEYS, "source")):
            shown = repr(data) if len(repr(data)) <= 60 else repr(data)[:57] + "..."
            raise MoescopeError(f"{where + ': ' if where else ''}the recorded model {shown} is not an object of "
                                "model_type and config_hash strings")
        return cls(data.get("model_type"), data.get("config_hash"), data.get("source") or "")

    def to_dict(self, source: bool = False) -> dict[str, str | None]:
        data = {"model_type": self.model_type, "config_hash": self.config_hash}
        return {**data, "source": self.source} if source else data

    def mismatch(self, other: ModelIdentity) -> str | None:
        """The first of model type and config hash that differs, as "KEY A vs B"; None when they agree.
        A key either side does not record (files from older versions) is not compared."""
        for key in KEYS:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is not None and theirs is not None and mine != theirs:
                return f"{key} {mine} vs {theirs}"
        return None

    def require(self, model: ModelIdentity, what: str) -> None:
        """Refuse a `what` (a plan, a profile, an interrupted run recorded with this identity) for `model`."""
        differs = self.mismatch(model)
        if differs:
            raise MoescopeError(f"the {what} is for another model: {differs} (the {what}'s vs this model's); make it "
                                "again from this model")
