"""Weights that accelerate offloaded (to the CPU or to disk) while their layer runs on a device.

Such a module's parameters sit on the meta device; accelerate's hook loads them from a store for
each forward call and drops them after. Code that reads or edits weights outside a forward call
(quantisation, distortion measurements) does it inside `resident(module)`: the weights are loaded
onto the execution device for the block, forward calls inside it use them as they are, and with
`keep_edits` the edited weights are written back to the store (in place for CPU offload, to a new
file in the model's own offload folder for disk offload; the source checkpoint is never touched).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from moescope.errors import MoescopeError


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps this module's own weights off its execution device."""
    return bool(getattr(getattr(module, "_hf_hook", None), "offload", False))


def any_offloaded(model: nn.Module) -> bool:
    return any(is_offloaded(module) for module in model.modules())


def refuse_offloaded(model: nn.Module, what: str) -> None:
    """MoescopeError naming `what` when part of `model` is offloaded."""
    if any_offloaded(model):
        raise MoescopeError(f"{what} needs every weight on a device, and --max-memory offloaded some: raise the "
                            "limits so that nothing is offloaded, or use a larger device")


@contextmanager
def resident(module: nn.Module, keep_edits: bool = False) -> Iterator[nn.Module]:
    """`module` with its own weights on its execution device for the block (a no-op where they
    already are); with `keep_edits`, what the block changed in them is stored when it ends."""
    hook = getattr(module, "_hf_hook", None)
    if not is_offloaded(module):
        yield module
        return
    hook.pre_forward(module)
    hook.offload = False  # forward calls inside the block use these weights, not fresh copies from the store
    try:
        yield module
        if keep_edits:
            _store(module, hook)
    finally:
        hook.offload = True
        hook.post_forward(module, None)


def _store(module: nn.Module, hook) -> None:
    """Write the module's own parameters back into accelerate's store of offloaded weights."""
    from safetensors.torch import save_file

    prefix, loader = hook.weights_map.prefix, hook.weights_map.dataset
    for name, param in module.named_parameters(recurse=False):
        key = prefix + name
        if key in loader.state_dict:  # offloaded to CPU memory: edit the stored tensor
            loader.state_dict[key].copy_(param.data)
            continue
        if loader.save_folder is None:
            raise MoescopeError(f"cannot store the edited {key}: its layer was offloaded without a folder")
        file = Path(loader.save_folder) / f"{key}.edited.safetensors"
        save_file({key: param.data.detach().cpu().contiguous()}, str(file))
        loader.index[key] = {"safetensors_file": str(file), "weight_name": key,
                             "dtype": str(param.dtype).removeprefix("torch.")}
