"""moescope: measure how a Mixture-of-Experts model uses its experts, then compress it safely.

The top-level names are imported lazily so that `import moescope` (and `moescope --help`) does not
import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "capture_routing": "moescope.backends.hf.capture",
    "RoutingEvent": "moescope.backends.hf.capture",
    "find_moe_layers": "moescope.models.registry",
    "load": "moescope.backends.mlx.loading",  # mlx-lm's (model, tokenizer), per-expert widths too
    "load_model": "moescope.backends.hf.loading",
    "load_tokenizer": "moescope.backends.hf.loading",
    "Placement": "moescope.backends.hf.loading",
    "MoescopeError": "moescope.errors",
    "Profile": "moescope.profiling.store",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moescope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
