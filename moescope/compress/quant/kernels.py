"""Fake quantisation: each weight rounded to a group-wise round-to-nearest grid and stored back.

The result goes back into the model's own dense tensors (`param.data[e]` of the fused `experts.*`
tensors), so a quantised model runs exactly as fast as the original and can be evaluated anywhere.
Groups run along the input dimension of each linear map (`group_size` inputs share one scale), as in
MLX, llama.cpp, GPTQ and torchao. Experts that share a bit width are quantised in one tensor op.

- symmetric: scale = absmax / ((2^b - 1) / 2), q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1),
  w' = q * scale (torchao's convention: all 2^b levels are used). One fp16 scale per group.
- asymmetric: scale = (max - min) / (2^b - 1), q = round((w - min) / scale), w' = q * scale + min
  (MLX's affine mode and llama.cpp's Q4_1: the offset is a float, not an integer zero point).
  An fp16 scale and an fp16 offset per group.
Either way |w - w'| <= scale / 2 for every weight. A last group shorter than `group_size` (input
dimension not divisible by it) is a group of its own.

Scales (`scales`): "minmax" takes the range from the group's extremes, as above. "mse" also tries
the range shrunk by each factor in `SHRINK_FACTORS` (clipping the outermost weights) and keeps, per
group, the candidate with the least squared error: never worse than minmax, and at 2-3 bits much
better (llm-compressor's "mse" observer and llama.cpp's scale search do the same kind of search). It
takes about a dozen times as long. "mlx" (asymmetric only) is MLX's affine rule, `round_to_mlx_grid`:
the plans `moescope export --format mlx` writes use it, so that `quantize --plan` reproduces the
weights mlx-lm serves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moescope.models.layout import ExpertMatrix
from moescope.plans import UNQUANTISED, QuantOptions, check_bits

CHUNK_ELEMENTS = 2**25  # quantise at most this many weights at once (bounds the float32 temporaries)
SHRINK_FACTORS = tuple(1 - 0.05 * k for k in range(1, 13))  # 0.95 ... 0.40 of the group's range


def fake_quantize(w: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = True,
                  scales: str = "minmax") -> torch.Tensor:
    """`w` quantised to `bits` and dequantised, in groups of `group_size` along its last dimension,
    with minmax, MSE-searched or (asymmetric only) MLX's `scales`.

    Computed in float32 and returned in `w`'s dtype. 16 bits returns `w` itself.
    """
    if check_bits(bits) == UNQUANTISED:
        return w
    n = w.shape[-1]
    size = min(group_size, n)
    pad = -n % size
    x = w.reshape(-1, 1, n).to(torch.float32, copy=True)  # a private copy: the ops below work in place
    if pad:  # repeat the last input: min, max and absmax of the short last group stay its own
        x = F.pad(x, (0, pad), mode="replicate")
    x = x.view(x.shape[0], -1, size)
    shrink = 1.0
    if scales == "mse":  # each group's best factor first, then one rounding with it
        least = round_to_grid(x, bits, symmetric).sub_(x).square_().sum(-1, keepdim=True)
        shrink = torch.ones_like(least)
        for factor in SHRINK_FACTORS:
            error = round_to_grid(x, bits, symmetric, factor).sub_(x).square_().sum(-1, keepdim=True)
            better = error < least
            shrink.masked_fill_(better, factor)
            least = torch.where(better, error, least)
    x = round_to_mlx_grid(x, bits) if scales == "mlx" else round_to_grid(x, bits, symmetric, shrink, in_place=True)
    x = x.view(-1, n + pad)
    return (x[:, :n] if pad else x).reshape(w.shape).to(w.dtype)


def round_to_grid(x: torch.Tensor, bits: int, symmetric: bool, shrink: float | torch.Tensor = 1.0,
                  in_place: bool = False) -> torch.Tensor:
    """Groups `x` [..., group] rounded to their `bits` grid, its range `shrink` (a number, or one per
    group [..., 1]) times the group's own."""
    y = x if in_place else x.clone()
    if symmetric:
        scale = x.amax(-1, keepdim=True).maximum(-x.amin(-1, keepdim=True)).mul_(shrink).div_((2**bits - 1) / 2)
        scale.masked_fill_(scale == 0, 1.0)
        return y.div_(scale).round_().clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).mul_(scale)
    low = x.amin(-1, keepdim=True) * shrink
    scale = (x.amax(-1, keepdim=True) * shrink - low) / (2**bits - 1)
    scale.masked_fill_(scale == 0, 1.0)
    return y.sub_(low).div_(scale).round_().clamp_(0, 2**bits - 1).mul_(scale).add_(low)


def round_to_mlx_grid(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Groups `x` [..., group] rounded as `mlx.core.quantize` does in affine mode: the group's extreme
    of larger magnitude is kept exactly, and the step is adjusted so that zero lies on the grid
    (the other extreme may then be clipped by up to half a step)."""
    levels = 2**bits - 1
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    low_wins = low.abs() > high.abs()
    scale = ((high - low) / levels).clamp_min_(1e-7)
    scale = torch.where(low_wins, scale, -scale)
    edge = torch.where(low_wins, low, high)
    steps = torch.round(edge / scale)
    scale = torch.where(steps != 0, edge / steps, scale)
    offset = torch.where(steps == 0, torch.zeros_like(edge), edge)
    return x.sub(offset).div_(scale).round_().clamp_(0, levels).mul_(scale).add_(offset)


def quantize_experts_(matrix: ExpertMatrix, experts: list[int], bits: int, options: QuantOptions) -> None:
    """Quantise the listed experts' slices of `matrix` in place, all at once (in chunks of bounded size)."""
    step = max(1, CHUNK_ELEMENTS // matrix.view[0].numel())
    for start in range(0, len(experts), step):
        index = torch.tensor(experts[start : start + step], device=matrix.view.device)
        q = fake_quantize(matrix.as_out_in(matrix.view[index]), bits, options.group_size, options.symmetric,
                          options.scales)
        matrix.view[index] = matrix.as_out_in(q)


def squared_errors(matrix: ExpertMatrix, bits: int, options: QuantOptions,
                   sensitivity: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared quantisation errors, each weighted by `sensitivity` [same shape as `view`] when
    given, and sum of squared weights) per expert of `matrix`, float64 [E]."""
    errors, norms = [], []
    step = max(1, CHUNK_ELEMENTS // matrix.view[0].numel())
    for start in range(0, matrix.view.shape[0], step):
        w = matrix.as_out_in(matrix.view[start : start + step])
        f = None if sensitivity is None else matrix.as_out_in(sensitivity[start : start + step])
        q = fake_quantize(w, bits, options.group_size, options.symmetric, options.scales)
        error = (q.float() - w.float()).square()
        errors.append((error if f is None else error * f).sum((1, 2)).double())
        norms.append(w.float().square().sum((1, 2)).double())
    return torch.cat(errors), torch.cat(norms)
