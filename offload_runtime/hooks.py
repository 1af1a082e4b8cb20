"""The forward hook that ties modules to the scheduler (accelerate ``ModelHook`` style).

One :class:`GroupHook` is attached to every module whose forward reads a streamed group (the group's own
module and the modules owning tied aliases of its tensors), and one to the root model to mark where a
forward pass starts and ends (the execution order is learned per pass). The hook wraps ``module.forward``;
the module's parameters are *not* touched by the hook: they are permanent views into the group's slot,
bound once at dispatch, so ``pre_forward`` only waits for the slot to hold the right bytes and
``post_forward`` releases it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from offload_runtime.errors import DeviceMemoryError

if TYPE_CHECKING:
    from offload_runtime.scheduler.engine import Engine

HOOK_ATTR = "_offload_hook"


class GroupHook:
    """Acquire groups before a module's forward, release them after.

    Args:
        engine: the scheduler :class:`~offload_runtime.scheduler.engine.Engine`.
        groups (`tuple[str, ...]`, defaults to ``()``): streamed groups the module's forward reads.
        marks_pass (`bool`, defaults to `False`): the module is the root model; its forward is one pass.
    """

    def __init__(self, engine: Engine, groups: tuple[str, ...] = (), *, marks_pass: bool = False) -> None:
        self.engine = engine
        self.groups = tuple(groups)
        self.marks_pass = marks_pass
        self.calls = 0
        self._original_forward: Any = None
        self._wrapper: Any = None
        self._had_instance_forward = False

    def __repr__(self) -> str:
        return f"GroupHook(groups={list(self.groups)}, marks_pass={self.marks_pass}, calls={self.calls})"

    # ---- lifecycle ----------------------------------------------------------------------------------
    def attach(self, module: nn.Module) -> nn.Module:
        """Wrap ``module.forward``; the patched attributes are ``forward`` and ``_offload_hook`` only."""
        if hasattr(module, HOOK_ATTR):
            raise ValueError(
                f"{type(module).__name__} already has an offload hook: {getattr(module, HOOK_ATTR)}"
            )
        self._had_instance_forward = "forward" in module.__dict__
        self._original_forward = module.forward
        original = self._original_forward

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._original_forward is None:  # detached while another library's wrapper still calls us
                return original(*args, **kwargs)
            try:
                args, kwargs = self.pre_forward(module, *args, **kwargs)
            except torch.OutOfMemoryError as exc:
                self._raise_out_of_memory(exc)
            try:
                output = original(*args, **kwargs)
            except BaseException as exc:
                self.post_forward(module, None)  # the slots are released whatever went wrong
                if isinstance(exc, torch.OutOfMemoryError):
                    self._raise_out_of_memory(exc)
                raise
            return self.post_forward(module, output)

        module.forward = forward
        self._wrapper = forward
        setattr(module, HOOK_ATTR, self)
        return module

    def _raise_out_of_memory(self, exc: torch.OutOfMemoryError) -> None:
        """Re-raise a CUDA OOM as :class:`DeviceMemoryError` naming the group (once, innermost hook)."""
        if isinstance(exc, DeviceMemoryError):
            raise exc
        held = self.engine.stats.peak_weight_bytes
        where = f"the forward of {self.groups[0]!r}" if self.groups else "the model's forward"
        raise DeviceMemoryError(
            f"CUDA ran out of memory in {where}: {str(exc).splitlines()[0]}",
            group=self.groups[0] if self.groups else None,
            expected=held,
            hint="its slots were released and the model stays usable: free device memory, shorten the "
            "input or lower budget_gb to leave more room for activations and the KV cache",
        ) from exc

    def detach(self, module: nn.Module) -> nn.Module:
        """Undo :meth:`attach`: the module's ``forward`` is what it was before.

        If another library wrapped ``forward`` after us (accelerate's ``add_hook_to_module`` keeps our
        wrapper as its ``_old_forward``), its wrapper stays and ours becomes a plain pass-through to the
        forward we wrapped, so that hook keeps working.
        """
        if getattr(module, HOOK_ATTR, None) is not self:
            return module
        if module.__dict__.get("forward") is self._wrapper:
            if self._had_instance_forward:
                module.forward = self._original_forward
            else:
                del module.forward
        delattr(module, HOOK_ATTR)
        self._original_forward = None
        self._wrapper = None
        return module

    # ---- forward ------------------------------------------------------------------------------------
    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        """Start a pass (root), then make every group of this module ready on the compute stream."""
        self.calls += 1
        if self.marks_pass:
            self.engine.begin_pass()
        acquired: list[str] = []
        try:
            for group in self.groups:
                self.engine.acquire(group)
                acquired.append(group)
        except BaseException:
            for group in reversed(acquired):
                self.engine.release(group)
            raise
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        """Release this module's groups (record their release events), then end the pass (root)."""
        for group in reversed(self.groups):
            self.engine.release(group)
        if self.marks_pass:
            self.engine.end_pass()
        return output


def attached_hooks(model: nn.Module) -> list[tuple[nn.Module, GroupHook]]:
    """Every (module, hook) pair under ``model``."""
    return [
        (m, getattr(m, HOOK_ATTR))
        for m in model.modules()
        if isinstance(getattr(m, HOOK_ATTR, None), GroupHook)
    ]
