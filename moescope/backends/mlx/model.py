"""An mlx-lm model behind the slice of transformers' causal-LM interface that moescope's loops use.

`MlxCausalLM(input_ids=..., attention_mask=..., cache=..., use_cache=..., logits_to_keep=...)` takes
and returns torch tensors on the CPU (`.logits`, float32) and keeps mlx-lm's own cache objects in
`.cache`, so the profiling run, the evaluation protocol, the gate and the replay run an MLX model with
the code they run a transformers model with. `generate` is greedy decoding in the same batches.

Padding: moescope pads batches on the left (profiling, the gate) or on the right (accuracy, replay).
mlx-lm batches the way its own BatchGenerator does: prompts right-padded, each cache told the true
lengths (`prepare`) and, after the prefill, rolled so the padding sits on the left (`finalize`); the
rotary positions then count from each prompt's first real token, as moescope's torch loops set
them. Rows are shifted to that layout and the logits shifted back, so callers see their own columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moescope.errors import MoescopeError
from moescope.models.base import MoELayer

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SwitchBlock:
    """One mlx-lm MoE block: the module that routes, its SwitchGLU / SwitchMLP and its router."""

    index: int  # decoder layer index, as MoELayer.index
    path: str
    block: Any
    switch: Any
    router: Any | None


@dataclass
class TokenLayout:
    """Where each token of one forward call sits, in the caller's columns (see RoutingEvent)."""

    rows: torch.Tensor  # [B * W] batch row of each token of the mlx input
    positions: torch.Tensor  # [B * W] its column in the caller's input
    keep: torch.Tensor | None  # [B * W] real tokens (None: no padding)

    @property
    def tokens(self) -> int:
        return len(self.rows)


@dataclass
class MlxOutput:
    logits: torch.Tensor  # [B, W or logits_to_keep, vocab] float32, in the caller's columns
    cache: list | None


def to_torch(array) -> torch.Tensor:
    """An evaluated mlx array as a CPU torch tensor (float32 for any floating dtype: numpy has no bfloat16)."""
    import mlx.core as mx

    if mx.issubdtype(array.dtype, mx.floating) and array.dtype != mx.float32:
        array = array.astype(mx.float32)
    return torch.from_numpy(np.array(array, copy=True))


def padding_spans(mask: torch.Tensor | None, batch: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(first real column, real tokens) of each row; MoescopeError for a mask with holes."""
    if mask is None:
        return np.zeros(batch, np.int64), np.full(batch, width, np.int64)
    real = mask.bool().cpu().numpy()
    lengths = real.sum(1)
    starts = np.where(lengths > 0, real.argmax(1), 0)
    columns = np.arange(width)
    if not ((columns >= starts[:, None]) & (columns < (starts + lengths)[:, None]) == real).all():
        raise MoescopeError("the MLX backend takes padding on one side of each row, not holes in the attention mask")
    return starts, lengths


class MlxCausalLM:
    """See the module docstring. `moe_layers` are the MoE layers as models.registry describes them (from
    the checkpoint's transformers config on the meta device), `blocks` the mlx-lm modules they run as."""

    backend = "mlx"

    def __init__(self, module, config, moe_layers: list[MoELayer], blocks: list[SwitchBlock], generation_config=None):
        self.module = module
        self.config = config
        self.moe_layers = moe_layers
        self.blocks = blocks
        self.generation_config = generation_config
        self.recorders: list = []  # active captures (backends.mlx.capture), told about every forward call

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the returned tensors live; mlx itself runs on its default device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (of the scales, for quantised layers)."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        dtype = next(str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(self.module.parameters())
                     if mx.issubdtype(v.dtype, mx.floating))
        return TORCH_DTYPES[dtype]

    def __call__(self, *args, **kwargs) -> MlxOutput:
        return self.forward(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids=None,
                cache: list | None = None, use_cache: bool = False, logits_to_keep: int = 0) -> MlxOutput:
        """One forward call; `position_ids` are implied (mlx-lm counts positions in its caches)."""
        import mlx.core as mx

        batch, width = input_ids.shape
        ids = input_ids.cpu().numpy()
        starts, lengths = (np.zeros(batch, np.int64), np.full(batch, width, np.int64)) if cache is not None \
            else padding_spans(attention_mask, batch, width)
        shifted = bool(starts.any())
        if shifted:  # every row's real tokens first (right padding)
            ids = np.stack([np.roll(row, -start) for row, start in zip(ids, starts)])
        padded = bool((lengths < width).any())
        batched = cache is None and use_cache and padded
        if cache is None and use_cache:
            cache = self._batch_cache(lengths, width) if padded else self._plain_cache()
        for recorder in self.recorders:
            recorder.begin_call(self._layout(starts, lengths, width, padded))
        logits = self.module(mx.array(ids), cache=cache)
        if batched:  # the padding moves to the left, where decoding expects it
            for entry in cache:
                entry.finalize()
        keep = logits_to_keep or width
        if shifted or keep < width:
            columns = (np.arange(width - keep, width)[None, :] - starts[:, None]) % width
            logits = mx.take_along_axis(logits, mx.array(columns)[..., None], axis=1)
        pending = [array for recorder in self.recorders for array in recorder.arrays()]
        mx.eval(logits, pending, [entry.state for entry in cache or []])
        for recorder in self.recorders:
            recorder.end_call()
        return MlxOutput(to_torch(logits), cache)

    def _layout(self, starts: np.ndarray, lengths: np.ndarray, width: int, padded: bool) -> TokenLayout:
        batch = len(starts)
        columns = np.arange(width)
        rows = torch.arange(batch).repeat_interleave(width)
        positions = torch.from_numpy((columns[None, :] + starts[:, None]).reshape(-1))
        keep = torch.from_numpy((columns[None, :] < lengths[:, None]).reshape(-1)) if padded else None
        return TokenLayout(rows, positions, keep)

    def _plain_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.module)

    def _batch_cache(self, lengths: np.ndarray, width: int) -> list:
        """Per-layer batch caches for right-padded rows of `lengths` tokens (mlx-lm's BatchGenerator recipe)."""
        rows = [self._plain_cache() for _ in lengths]
        try:
            merged = [type(first).merge([row[i] for row in rows]) for i, first in enumerate(rows[0])]
        except (AttributeError, NotImplementedError, ValueError) as error:
            raise MoescopeError(f"mlx-lm cannot batch this model's cache ({error}); use --batch-size 1") from None
        for entry in merged:
            entry.prepare(lengths=lengths.tolist(), right_padding=(width - lengths).tolist())
        return merged

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, pad_token_id: int | None = None, eos_token_id=None, **_) -> torch.Tensor:
        """Greedy continuations: the input columns, then up to `max_new_tokens` new ones; a row that has
        produced an end-of-text token continues with `pad_token_id` (as transformers' generate does)."""
        if do_sample:
            raise MoescopeError("the MLX backend decodes greedily only")
        eos = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                           else list(eos_token_id), dtype=torch.long)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        output = self.forward(input_ids, mask, use_cache=True, logits_to_keep=1)
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        new = []
        for step in range(max_new_tokens):
            token = output.logits[:, -1].argmax(-1)
            if pad_token_id is not None:
                token = torch.where(done, torch.tensor(pad_token_id), token)
            new.append(token)
            done |= torch.isin(token, eos)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            output = self.forward(token[:, None], mask, cache=output.cache, use_cache=True, logits_to_keep=1)
        return torch.cat([input_ids.cpu(), torch.stack(new, 1)], dim=1) if new else input_ids.cpu()
