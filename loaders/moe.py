"""Which modules of a model are mixture-of-experts *experts modules*, and how their experts are named.

In transformers 5.x an MoE layer keeps its routed experts stacked in one module (``MixtralExperts``,
``Qwen3MoeExperts``, ``GptOssExperts``, ...): each parameter holds every expert along its first dimension
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; gpt-oss stores them transposed and adds
``gate_up_proj_bias [E, 2I]``, ``down_proj_bias [E, H]``). Expert ``e`` is the slice ``param[e]`` of
every stacked parameter. The router, the shared experts and everything else of the layer live in other
modules and are not experts.

Detection is structural (no list of class names), so a new architecture built the same way is found too;
a model whose config says it has experts but where no such module is found gets one warning (logger
``offload_runtime``) and stays at block granularity.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger("offload_runtime")

# config fields holding the number of routed experts, by architecture family
NUM_EXPERTS_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_SLICE = re.compile(r"^(?P<param>.+)\[(?P<index>\d+)\]$")


@dataclass(frozen=True)
class ExpertsModule:
    """One experts module of a model.

    Attributes:
        path: its module path (``"model.layers.1.mlp.experts"``).
        num_experts: ``E``, the first dimension of every stacked parameter.
        params: its stacked parameters' attribute names, in registration order (``("gate_up_proj",
            "down_proj")``).
    """

    path: str
    num_experts: int
    params: tuple[str, ...]

    def param_name(self, attr: str) -> str:
        """Full state-dict name of stacked parameter ``attr``."""
        return f"{self.path}.{attr}" if self.path else attr


def config_num_experts(config) -> int | None:
    """The number of routed experts a model config declares, or None (a dense model)."""
    for field in NUM_EXPERTS_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def stacked_expert_params(module: nn.Module, num_experts: int | None = None) -> tuple[str, ...] | None:
    """The stacked parameters of ``module`` if it is an experts module, else None.

    ``module`` is an experts module when it owns at least one 3-D parameter, every parameter it owns
    directly is 3-D or 2-D (stacked weights, stacked biases) with the same first dimension ``E``, ``E``
    equals the module's ``num_experts`` attribute (else the ``num_experts`` argument, typically the config's),
    and no submodule holds parameters (a module per expert is not a stack). Buffers are not experts.

    Args:
        module (`nn.Module`): the candidate (on any device, ``meta`` included).
        num_experts (`int`, *optional*): the expected ``E`` when the module has no ``num_experts``
            attribute.

    Returns:
        `tuple[str, ...]` or `None`: the parameters' attribute names in registration order.
    """
    expected = getattr(module, "num_experts", None)
    if not isinstance(expected, int) or isinstance(expected, bool):
        expected = num_experts
    if not expected or expected < 1:
        return None
    own = list(module.named_parameters(recurse=False))
    if not own or any(True for child in module.children() for _ in child.parameters()):
        return None
    if not any(p.dim() == 3 for _, p in own):
        return None
    if any(p.dim() not in (2, 3) or p.shape[0] != expected for _, p in own):
        return None
    return tuple(name for name, _ in own)


def find_expert_modules(model: nn.Module) -> list[ExpertsModule]:
    """Every experts module of ``model`` (see :func:`stacked_expert_params`), in registration order.

    When the model's config declares routed experts but none is found, logs one line saying the model
    stays at block granularity.
    """
    declared = config_num_experts(getattr(model, "config", None))
    found = []
    for path, module in model.named_modules():
        params = stacked_expert_params(module, declared)
        if params is not None:
            found.append(ExpertsModule(path, int(next(module.parameters()).shape[0]), params))
    if declared and not found:
        logger.warning(
            "%s declares %d experts but has no stacked experts module: its experts are packed and "
            "streamed with their block (block granularity)",
            type(model).__name__,
            declared,
        )
    return found


def slice_name(param: str, index: int) -> str:
    """The stored name of slice ``index`` of stacked parameter ``param``: ``"...gate_up_proj[3]"``."""
    return f"{param}[{index}]"


def parse_slice_name(name: str) -> tuple[str, int] | None:
    """``(param, index)`` of a :func:`slice_name`, or None for an ordinary tensor name."""
    match = _SLICE.match(name)
    return (match["param"], int(match["index"])) if match else None
