"""Launch a Triton kernel again without Triton's per-call Python: what a bound linear layer does per token.

``kernel[grid](*args)`` binds and specialises every argument, computes a cache key and checks globals on
each call: tens of microseconds of host time, more than a batch-1 GEMV of a 4096 x 4096 weight takes on an
H200. Its compiled launcher then calls ``data_ptr()`` and ``cuPointerGetAttribute`` for every tensor
argument (a driver call each: 11 per fused12 GEMV). A model decoding one token calls its linear layers back
to back, so that host time, not the kernels, sets the speed. A :class:`LaunchCache` (one per bound weight)
replays launches instead.

Protocol:

1. The caller describes a launch lazily: ``make()`` returns a :class:`Launch` (kernel, grid, positional
   arguments, constexprs, options, and ``per_call``: the very objects among its arguments that change from
   call to call: ``x``, ``out``, or a view of either that starts where it starts, e.g. gemv's 8-byte word
   view of ``x``).
2. The caller's **key** must determine Triton's specialisation of every per-call object (dtype, address
   modulo 16, strides, row count) and everything else the launch depends on (grid, config, stream, device).
   Every other argument must be the same object, with the same value, in every call with that key.
3. First call with a key (or while a launch hook is installed: profilers read it; or when Triton returns no
   compiled kernel: its interpreter): the standard ``kernel[grid](...)``. The compiled kernel is kept with
   the full argument list in signature order, constexprs included, in which

   * each per-call object (found by identity) is a slot filled per call with the address of ``x`` or of
     ``out``, whichever it starts at (checked here; a per-call object that starts elsewhere leaves the key
     unrecorded: every call with it takes the standard launch, correct and slower);
   * every other tensor is its address, an int (the launcher takes ints as pointers without asking the
     driver); the launch's own arguments are kept with the entry, so those tensors, and their addresses,
     stay alive as long as it.
4. A later call with the key: that list with this call's two addresses in the slots, given to the compiled
   kernel's launcher on the current stream (its C entry point when the kernel needs no scratch memory, else
   Triton's launcher object): the same kernel binary, the same argument values Triton would bind, none of
   its Python.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

X, OUT = 0, 1  # the per-call addresses a slot takes
_KNOBS: Any = None


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
    global _KNOBS
    if _KNOBS is None:
        from triton import knobs

        _KNOBS = knobs
    runtime = _KNOBS.runtime  # checked on every replay: no generator, no any()
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _launcher(compiled: Any) -> tuple[Callable, tuple]:
    """``(function, arguments after the stream)`` that launch ``compiled`` as ``function(gx, gy, gz,
    stream, *those, *kernel arguments)``: Triton's C entry point when the kernel needs no global or profile
    scratch (what ``CudaLauncher.__call__`` would pass it: no scratch pointers), else the launcher object."""
    run = compiled.run
    entry = getattr(run, "launch", None)
    no_scratch = getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0
    hooks = (compiled.packed_metadata, None, None, None)  # launch metadata and enter/exit hooks: none
    if entry is not None and no_scratch and hasattr(run, "launch_cooperative_grid"):
        flags = (run.launch_cooperative_grid, run.launch_pdl, None, None)
        return entry, (compiled.function, *flags, *hooks)
    return run, (compiled.function, *hooks)


@dataclass
class _Replay:
    call: Callable
    # grid (3), the stream (position 3, per call), the launcher's arguments, then the kernel's (tensors as
    # addresses; the slots' are filled per call)
    values: list
    slots: list[tuple[int, int]]  # (position in ``values``, X or OUT)
    keep: tuple  # the launch's own arguments: the tensors whose addresses ``values`` holds


def _record(launch: Launch, compiled: Any, x: torch.Tensor, out: torch.Tensor) -> _Replay | None:
    """The replay of a launch just made (see step 3 of the module docstring); None when a per-call object
    starts at neither ``x`` nor ``out``."""
    call, after_stream = _launcher(compiled)
    head = [*(*launch.grid, 1, 1)[:3], None, *after_stream]
    args, slots = [], []
    starts = (x.data_ptr(), out.data_ptr())
    for position, arg in enumerate(launch.full_args(), start=len(head)):
        if any(arg is obj for obj in launch.per_call):
            address = arg.data_ptr()
            if address not in starts:
                return None
            slots.append((position, starts.index(address)))
            args.append(None)
        elif isinstance(arg, torch.Tensor):
            args.append(arg.data_ptr())
        else:
            args.append(arg)
    return _Replay(call, head + args, slots, launch.args)


class LaunchCache:
    """Compiled launches by key (see the module docstring). ``launches`` counts standard launches and
    ``replays`` direct ones (statistics, and what tests check)."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Replay] = {}
        self.launches = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._entries)

    def replay(self, key: Hashable, x: torch.Tensor, out: torch.Tensor, stream: int) -> bool:
        """Enqueue the launch recorded for ``key`` with this call's ``x`` and ``out`` on ``stream`` (a CUDA
        stream handle, which the key must name); False, doing nothing, when there is none to replay."""
        entry = self._entries.get(key)
        if entry is None or _hooks_installed():
            return False
        values = entry.values.copy()
        values[3] = stream
        addresses = (x.data_ptr(), out.data_ptr())
        for position, which in entry.slots:
            values[position] = addresses[which]
        entry.call(*values)
        self.replays += 1
        return True

    def run(
        self,
        key: Hashable,
        x: torch.Tensor,
        out: torch.Tensor,
        make: Callable[[], Launch],
        stream: int | None = None,
    ) -> None:
        """Enqueue the launch for ``key`` with this call's ``x`` and ``out`` on ``stream`` (a CUDA stream
        handle; the current stream of ``x``'s device when None), which the key must name: a replay, or the
        standard launch of ``make()`` (recorded for the next call)."""
        if stream is None:
            stream = torch.cuda.current_stream(x.device).cuda_stream
        if self.replay(key, x, out, stream):
            return
        launch = make()
        compiled = launch.run()
        self.launches += 1
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return  # the interpreter (or an old Triton): every call takes the standard launch
        entry = _record(launch, compiled, x, out)
        if entry is not None:
            self._entries[key] = entry

    def clear(self) -> None:
        self._entries.clear()
