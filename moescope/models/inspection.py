"""The MoE structure of a checkpoint on disk, from config.json and the safetensors headers alone.

Nothing is loaded but the headers (a JSON block at the start of each file), so a 600 GB checkpoint
is described in a second. Expert tensors are recognised by their names on disk (models.layout).
"""

from __future__ import annotations

from pathlib import Path

from moescope.checkpoints import check_checkpoint_dir, headers, read_config
from moescope.errors import MoescopeError
from moescope.models.layout import (
    EXPERT_COUNT_KEYS,
    TOP_K_KEYS,
    check_routing_config,
    config_sections,
    describe_tensors,
    dict_value,
)
from moescope.models.registry import family_for


def inspect_checkpoint(model_dir: str | Path) -> dict:
    """A JSON-ready description of the checkpoint's MoE structure."""
    model_dir = check_checkpoint_dir(model_dir)
    config = read_config(model_dir)
    check_routing_config(config, str(model_dir / "config.json"))
    text = config_sections(config)[0]
    model_type = text.get("model_type") or config.get("model_type", "unknown")
    expert_count, top_k = dict_value(config, EXPERT_COUNT_KEYS), dict_value(config, TOP_K_KEYS)
    found = describe_tensors(headers(model_dir))
    layers = sorted(set(found["experts_on_disk"]) | set(found["fused_experts"]))
    if not layers:
        raise MoescopeError(f"no MoE layers found in {model_type}: no tensor in {model_dir} is named '*.experts.*'")
    per_layer = {layer: found["experts_on_disk"].get(layer) or expert_count or found["fused_experts"][layer]
                 for layer in layers}
    family = family_for(model_type)
    renormalize = family.model_types.get(model_type, "config")
    if renormalize == "config":
        renormalize = bool(text.get("norm_topk_prob", False))
    return {
        "model_type": model_type,
        "moe_layers": layers,
        "num_layers": text.get("num_hidden_layers", text.get("n_layers")),
        "experts_per_layer": per_layer,
        "top_k": top_k,
        "router_family": family.name,
        "renormalize": renormalize,
        "shared_expert": found["shared_expert"],
        "params_total": found["params_total"],
        "params_in_experts": found["params_in_experts"],
        "expert_share": found["params_in_experts"] / found["params_total"] if found["params_total"] else 0.0,
        "bytes_per_expert": found["bytes_in_experts"] // sum(per_layer.values()),
        "bytes_total": found["bytes_total"],
    }
