"""The launch cache's protocol (native/triton_launch.py), checked on the CPU with a stand-in for Triton."""

from __future__ import annotations

import pytest
import torch

from offload_runtime.native.triton_launch import Launch, LaunchCache


class FakeCompiled:
    """What ``kernel[grid](...)`` returns on a GPU: a launcher and its handles."""

    function, packed_metadata = "fn-handle", "meta"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, *args) -> None:
        self.calls.append(args)


class FakeKernel:
    def __init__(self, returns_compiled: bool = True) -> None:
        self.arg_names = ["x_ptr", "w_ptr", "y_ptr", "n", "BLOCK", "EVEN"]
        self.standard: list[tuple] = []
        self.compiled = FakeCompiled() if returns_compiled else None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.standard.append((grid, args, kwargs))
            return self.compiled

        return launch


def _make(kernel, weight, x, y, grid=(3, 2)):
    def make():
        launch = Launch(
            kernel, grid, (x, weight, y, 7), {"EVEN": True, "BLOCK": 64}, {"num_warps": 4}, (x, y)
        )
        return launch, lambda x_, y_: (x_, y_)

    return make


def test_first_call_launches_then_replays_with_this_calls_tensors():
    kernel, weight, cache = FakeKernel(), torch.zeros(4), LaunchCache()
    x1, y1 = torch.zeros(2), torch.zeros(3)
    cache.run("k", x1, y1, _make(kernel, weight, x1, y1), stream=11)
    assert len(kernel.standard) == 1 and kernel.compiled.calls == []
    _, args, kwargs = kernel.standard[0]
    assert args == (x1, weight, y1, 7) and kwargs == {"EVEN": True, "BLOCK": 64, "num_warps": 4}

    x2, y2 = torch.ones(2), torch.ones(3)
    never = _make(kernel, weight, None, None)  # a replay does not describe the launch again
    cache.run("k", x2, y2, lambda: pytest.fail("make() called on a replay") or never(), stream=12)
    assert len(kernel.standard) == 1 and (cache.launches, cache.replays) == (1, 1)
    (call,) = kernel.compiled.calls
    assert call[:9] == (3, 2, 1, 12, "fn-handle", "meta", None, None, None)
    # the arguments in signature order, constexprs by name, this call's x and y in their places
    assert call[9] is x2 and call[10] is weight and call[11] is y2
    assert call[12:] == (7, 64, True)


def test_another_key_launches_again():
    kernel, weight, cache = FakeKernel(), torch.zeros(4), LaunchCache()
    x, y = torch.zeros(2), torch.zeros(3)
    cache.run(("m", 1), x, y, _make(kernel, weight, x, y), stream=0)
    cache.run(("m", 2), x, y, _make(kernel, weight, x, y), stream=0)
    assert len(kernel.standard) == 2 and len(cache) == 2 and cache.replays == 0


def test_a_launch_hook_forces_the_standard_launch(monkeypatch):
    from triton import knobs

    kernel, weight, cache = FakeKernel(), torch.zeros(4), LaunchCache()
    x, y = torch.zeros(2), torch.zeros(3)
    cache.run("k", x, y, _make(kernel, weight, x, y), stream=0)
    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):  # Triton >= 3.4: a chain, as a profiler extends it
        monkeypatch.setattr(hook, "calls", [lambda *a: None])
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
    cache.run("k", x, y, _make(kernel, weight, x, y), stream=0)
    assert len(kernel.standard) == 2 and kernel.compiled.calls == []
    monkeypatch.undo()
    cache.run("k", x, y, _make(kernel, weight, x, y), stream=0)
    assert len(kernel.standard) == 2 and len(kernel.compiled.calls) == 1


def test_without_a_compiled_kernel_every_call_is_standard():
    kernel, weight, cache = FakeKernel(returns_compiled=False), torch.zeros(4), LaunchCache()
    x, y = torch.zeros(2), torch.zeros(3)
    for _ in range(3):
        cache.run("k", x, y, _make(kernel, weight, x, y), stream=0)
    assert len(kernel.standard) == 3 and len(cache) == 0


def test_gemv_launch_names_every_argument_of_the_kernel():
    """The launch the gemv and dot wrappers describe binds every kernel parameter exactly once."""
    from offload_runtime.native import fused12_format as fmt
    from offload_runtime.native.fused12_dot_kernel import DotConfig, dot_launch
    from offload_runtime.native.fused12_gemv_kernel import GemvConfig, gemv_launch

    planes = fmt.encode((torch.randn(40, 64) * 0.02).bfloat16())
    x = torch.randn(3, 64).bfloat16()
    y = torch.empty(3, 40, dtype=torch.bfloat16)
    for launch, bind in (
        gemv_launch(x, planes, y, None, GemvConfig()),
        dot_launch(x, planes, y, None, DotConfig()),
    ):
        names = launch.kernel.arg_names
        assert len(launch.full_args()) == len(names)
        assert set(launch.constexprs) == set(names[len(launch.args) :])
        per_call = bind(x, y)
        assert per_call[0] is x and per_call[-1] is y and len(per_call) == len(launch.per_call)
        assert all(any(a is obj for a in launch.args) for obj in launch.per_call)


def test_objects_derived_per_call_are_replaced_too():
    """A per-call object the launch derives from x (gemv's 8-byte word view of x) is this call's, not the
    first call's: the bug that made replays read a stale x."""
    kernel, cache = FakeKernel(), LaunchCache()

    def bind(x, y):
        return x, x.view(torch.int32), y

    def make_for(x, y):
        def make():
            x_, words, y_ = bind(x, y)  # the launch builds its own view, as gemv_launch does
            launch = Launch(
                kernel, (1,), (x_, words, y_, 7), {"EVEN": True, "BLOCK": 64}, per_call=(x_, words, y_)
            )
            return launch, bind

        return make

    x1, y1 = torch.zeros(2), torch.zeros(3)
    cache.run("k", x1, y1, make_for(x1, y1), stream=0)
    x2, y2 = torch.ones(2), torch.ones(3)
    cache.run("k", x2, y2, make_for(x2, y2), stream=0)
    (call,) = kernel.compiled.calls
    assert call[9] is x2 and call[11] is y2
    assert call[10].data_ptr() == x2.data_ptr()  # the view of this call's x
