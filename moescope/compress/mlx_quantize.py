"""`moescope quantize --backend mlx`: a bit plan written as a really quantised mlx-lm model.

The plan is coarsened to one width per layer and adjusted to what MLX stores (its group sizes, its
affine rule) exactly as `moescope export --format mlx` does, and the predicate that export writes
decides module by module (backends.mlx.quantize runs it through mlx-lm). The output holds mlx-lm's
packed weights, the source's config.json with the hub key names mlx-lm reads and its `quantization`
entries, the source's tokenizer and other files, the plan as served (`bit_plan.json`: what
`moescope quantize --plan ... --scales mlx` reproduces in torch) and the predicate
(`quant_predicate.py`). Stock `mlx_lm.load` opens it. Its size on disk is set against the plan's
arithmetic (compress.quant.memory).

With `per_expert`, nothing is coarsened: every expert keeps its planned width, packed in one group per
width and layer (backends.mlx.packed), and config.json lists the widths; the predicate then quantises
only what is not a routed expert. `moescope.load` and every moescope command open such a model; stock
mlx-lm does not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from moescope.backends.hf.loading import model_on_meta
from moescope.backends.mlx.quantize import save_quantised
from moescope.backends.select import is_mlx_layout
from moescope.checkpoints import check_checkpoint_dir, headers, read_config
from moescope.compress.checkpoint import CHECKPOINT, copy_other_files
from moescope.compress.export import coarsen, mlx
from moescope.compress.quant.apply import check_plan
from moescope.compress.quant.memory import MemoryEstimate, format_bytes, memory_estimate
from moescope.errors import MoescopeError
from moescope.models.layout import classify_key
from moescope.models.mlx_layout import PACKED_KEY, packed_entry, with_hub_keys
from moescope.output import atomic_directory, check_output
from moescope.plans import UNQUANTISED, BitPlan, bit_plan_text

PREDICATE_FILE = "quant_predicate.py"


@dataclass
class DiskSize:
    """Bytes of an mlx-lm model's safetensors: all tensors, and the routed experts' (codes, scales, biases)."""

    total_bytes: int
    expert_bytes: int


@dataclass
class MlxQuantised:
    out: Path
    plan: BitPlan  # coarsened and adjusted: what the model serves
    notes: list[str]  # what coarsening and MLX changed, as `export --format mlx` words it
    disk: DiskSize
    estimate: MemoryEstimate  # the plan's arithmetic for the same model

    def lines(self) -> list[str]:
        disk, est = self.disk, self.estimate
        return [f"on disk: {format_bytes(disk.total_bytes)} of tensors, routed experts "
                f"{format_bytes(disk.expert_bytes)} (codes, scales and offsets)",
                f"the plan's arithmetic: {est.format()}",
                f"experts on disk / arithmetic: {disk.expert_bytes / est.expert_bytes:.3f} (scales and offsets are "
                "stored in the model's dtype; the arithmetic counts 16 bits each)"]


def disk_size(model_dir: Path, experts_per_layer: dict[int, int]) -> DiskSize:
    """What the tensors of a checkpoint take, from its safetensors headers."""
    total = experts = 0
    for name, info in headers(model_dir).items():
        size = info["data_offsets"][1] - info["data_offsets"][0]
        total += size
        if classify_key(name, tuple(info["shape"]), experts_per_layer).kind in ("fused", "expert"):
            experts += size
    return DiskSize(total, experts)


def compile_predicate(text: str):
    """`quant_predicate` from the text `export --format mlx` writes: the same code decides in both."""
    namespace: dict = {}
    exec(compile(text, PREDICATE_FILE, "exec"), namespace)  # our own generated module, see compress.export.mlx
    return namespace["quant_predicate"]


def served_plan(plan: BitPlan, meta: nn.Module, mode: str, per_expert: bool) -> tuple[BitPlan, BitPlan, list[str]]:
    """(the plan as MLX serves it, the plan the predicate decides by, what changed in words): coarsened to one
    width per layer, or with `per_expert` each expert's own width, the experts then left to the packing."""
    if per_expert:
        served, notes = mlx.adjust(plan)
        unpacked = {index: [UNQUANTISED] * len(bits) for index, bits in served.layers.items()}
        return served, replace(served, layers=unpacked), notes
    coarse, changes = coarsen(plan, mode)
    served, adjusted = mlx.adjust(coarse)
    return served, served, [c.describe() for c in changes] + adjusted + mlx.model_notes(served, meta)


def quantize_mlx(source: str | Path, out: str | Path, plan: BitPlan, mode: str = "up",
                 overwrite: bool = False, per_expert: bool = False) -> MlxQuantised:
    """Write `plan` for `source` as a really quantised mlx-lm model in `out` (see the module docstring)."""
    source, out = check_checkpoint_dir(source), Path(out)
    check_output(out, CHECKPOINT, overwrite=overwrite, sources=[source])
    if is_mlx_layout(source):
        raise MoescopeError(f"{source} is already an mlx-lm model (its converted layout): quantise from the Hugging "
                            "Face checkpoint it was made from")
    meta = model_on_meta(source)
    layers = check_plan(plan, meta)
    served, decided, notes = served_plan(plan, meta, mode, per_expert)
    how = (f"per expert: the routed experts are packed at their own widths (config.json's {PACKED_KEY}); this "
           "predicate quantised the rest") if per_expert else f"coarsen {mode}"
    predicate = mlx.predicate(decided, [f"moescope quantize --backend mlx ({how})", *notes], Path(PREDICATE_FILE))
    with atomic_directory(out, CHECKPOINT, overwrite, sources=[source]) as work:
        quantization, switches = save_quantised(
            source, work, compile_predicate(predicate), served.layers if per_expert else None,
            lambda inputs: mlx.module_group_size(inputs, served.group_size))
        config = {**with_hub_keys(read_config(source)), "quantization": quantization,
                  "quantization_config": quantization}
        if switches:
            config[PACKED_KEY] = packed_entry(switches)
        copy_other_files(source, work, config)
        (work / "bit_plan.json").write_text(bit_plan_text(served))
        (work / PREDICATE_FILE).write_text(predicate)
    disk = disk_size(out, {layer.index: layer.num_experts for layer in layers})
    return MlxQuantised(out, served, notes, disk, memory_estimate(meta, served))
