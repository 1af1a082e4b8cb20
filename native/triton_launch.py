"""Launch a Triton kernel again without Triton's per-call Python: what a bound linear layer does per token.

``kernel[grid](*args)`` binds and specialises every argument, computes a cache key and checks globals on
each call: tens of microseconds of host time, more than a batch-1 GEMV of a 4096 x 4096 weight takes on an
H200. A model decoding one token calls its linear layers back to back, so that host time, not the kernels,
sets the speed. A :class:`LaunchCache` (one per bound weight) replays launches instead.

Protocol:

1. The caller describes a launch lazily: ``make()`` returns a :class:`Launch` (kernel, grid, positional
   arguments, constexprs, options, and ``per_call``: the very objects among its arguments that change from
   call to call, e.g. ``x``, a view of ``x``, ``out``) and a ``bind(x, out)`` that makes a call's
   per-call objects in the same order.
2. The caller's **key** must determine Triton's specialisation of every per-call object (dtype, address
   modulo 16, strides, row count) and everything else the launch depends on (grid, config, stream, device).
   Every other argument must be the same object, with the same value, in every call with that key.
3. First call with a key (or while a launch hook is installed: profilers read it; or when Triton returns no
   compiled kernel: its interpreter): the standard ``kernel[grid](...)``. The returned compiled kernel is
   kept with the full argument list in signature order, constexprs included, and the positions that held
   the launch's per-call objects (found by identity: an object ``bind`` makes anew, such as a view, is
   only found in the launch's own tuple).
4. A later call with the key: that argument list with this call's per-call objects in those positions, given
   to the compiled kernel's launcher on the current stream: the same kernel binary, the same argument
   values Triton would bind, none of its Python.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

BindPerCall = Callable[[torch.Tensor, torch.Tensor], tuple]


@dataclass(frozen=True)
class Launch:
    """One launch of a ``@triton.jit`` kernel, as ``kernel[grid](*args, **constexprs, **options)``."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)
    per_call: tuple = ()  # the objects among ``args`` that change between calls (see the module docstring)

    def run(self) -> Any:
        """The standard launch; returns what Triton returns (its compiled kernel on a GPU)."""
        return self.kernel[self.grid](*self.args, **self.constexprs, **self.options)

    def full_args(self) -> list:
        """Every argument in signature order, constexprs included (what Triton's launcher takes)."""
        names = self.kernel.arg_names
        return [*self.args, *(self.constexprs[name] for name in names[len(self.args) :])]


def _hooks_installed() -> bool:
    """Whether a launch hook is set (Triton >= 3.4 keeps a chain of hooks, empty unless a profiler adds
    one; older versions None or a function)."""
    from triton import knobs

    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


@dataclass
class _Replay:
    compiled: Any
    grid: tuple[int, int, int]
    args: list
    slots: list[tuple[int, int]]  # (argument position, index into the per-call objects)
    bind: BindPerCall


class LaunchCache:
    """Compiled launches by key (see the module docstring). ``launches`` counts standard launches and
    ``replays`` direct ones (statistics, and what tests check)."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Replay] = {}
        self.launches = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._entries)

    def run(
        self,
        key: Hashable,
        x: torch.Tensor,
        out: torch.Tensor,
        make: Callable[[], tuple[Launch, BindPerCall]],
        stream: int | None = None,
    ) -> None:
        """Enqueue the launch for ``key`` with this call's ``x`` and ``out`` on ``stream`` (a CUDA stream
        handle; the current stream of ``x``'s device when None), which the key must name."""
        entry = self._entries.get(key)
        if entry is not None and not _hooks_installed():
            args = entry.args.copy()
            per_call = entry.bind(x, out)
            for position, which in entry.slots:
                args[position] = per_call[which]
            compiled, grid = entry.compiled, entry.grid
            if stream is None:
                stream = torch.cuda.current_stream(x.device).cuda_stream
            compiled.run(
                grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                None, None, None, *args,
            )  # fmt: skip
            self.replays += 1
            return
        launch, bind = make()
        compiled = launch.run()
        self.launches += 1
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return  # the interpreter (or an old Triton): every call takes the standard launch
        args = launch.full_args()
        slots = [(i, j) for i, arg in enumerate(args) for j, obj in enumerate(launch.per_call) if arg is obj]
        grid = (*launch.grid, 1, 1)[:3]
        self._entries[key] = _Replay(compiled, grid, args, slots, bind)

    def clear(self) -> None:
        self._entries.clear()
