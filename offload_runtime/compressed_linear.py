"""Linear layers that compute from a compressed weight: the module side of the ``executed_compressed`` tier.

``bind(module, weight)`` makes an ``nn.Linear`` run ``fused_linear(x, weight, bias)`` on the weight's compute
format (``fused12`` planes viewed in the device-resident payload) instead of ``F.linear``; its ``weight``
parameter becomes a placeholder of the right shape, dtype and device that holds no memory (code that reads
``linear.weight.shape`` or ``.dtype`` keeps working; code that reads its values is not supported, which is
why only groups whose compute-format tensors are all ``nn.Linear`` weights qualify). ``unbind`` restores the
module exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

BIND_ATTR = "_offload_compressed_weight"


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` that allocates one element (stride 0 everywhere)."""
    return torch.empty(1, dtype=dtype, device=device).expand(shape)


def bind(module: nn.Linear, weight: Any, dtype: torch.dtype) -> None:
    """Make ``module`` compute from ``weight`` (a compute-format object such as ``fused12`` planes)."""
    from offload_runtime.native.fused12_linear import fused_linear
    from offload_runtime.native.triton_launch import LaunchCache

    if not isinstance(module, nn.Linear):
        raise TypeError(f"only nn.Linear weights compute compressed, got {type(module).__name__}")
    shape = (weight.rows, weight.cols)
    had_instance_forward = "forward" in module.__dict__
    original = module.forward
    launches = LaunchCache()  # this weight's compiled launches: a token's calls skip Triton's host work

    @functools.wraps(original)
    def forward(x: torch.Tensor) -> torch.Tensor:
        return fused_linear(x, weight, module.bias, launches=launches)

    module._parameters["weight"] = nn.Parameter(placeholder(shape, dtype, weight.device), requires_grad=False)
    module.forward = forward
    setattr(module, BIND_ATTR, (weight, original, had_instance_forward))


def unbind(module: nn.Module) -> None:
    """Undo :func:`bind` (the caller sets the weight parameter back)."""
    state = getattr(module, BIND_ATTR, None)
    if state is None:
        return
    _, original, had_instance_forward = state
    if had_instance_forward:
        module.forward = original
    else:
        del module.forward
    delattr(module, BIND_ATTR)


def executable_groups(model: nn.Module, groups: Any) -> set[str]:
    """Groups whose codec executes compressed and whose compute-format tensors are all ``nn.Linear`` weights
    (no tied aliases: a tied weight is also read as a plain tensor)."""
    from offload_runtime.native import get_codec

    out = set()
    for entry in groups:
        codec = get_codec(entry.codec)
        if not codec.executes_compressed or entry.aliases:
            continue
        names = codec.compute_tensors(entry.params, entry.layout, entry.chunks)
        if names and all(_is_linear_weight(model, name) for name in names):
            out.add(entry.name)
    return out


def _is_linear_weight(model: nn.Module, name: str) -> bool:
    path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        return False
    return attr == "weight" and isinstance(owner, nn.Linear)


def bound_weights(model: nn.Module) -> Mapping[str, Any]:
    """module path -> compute-format weight of every bound linear layer."""
    return {path: getattr(m, BIND_ATTR)[0] for path, m in model.named_modules() if hasattr(m, BIND_ATTR)}
