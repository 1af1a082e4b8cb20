"""The launch cache's protocol (native/triton_launch.py), checked on the CPU with a stand-in for Triton."""

from __future__ import annotations

import weakref

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
        return Launch(kernel, grid, (x, weight, y, 7), {"EVEN": True, "BLOCK": 64}, {"num_warps": 4}, (x, y))

    return make


def test_first_call_launches_then_replays_with_this_calls_addresses():
    kernel, weight, cache = FakeKernel(), torch.zeros(4), LaunchCache()
    x1, y1 = torch.zeros(2), torch.zeros(3)
    cache.run("k", x1, y1, _make(kernel, weight, x1, y1), stream=11)
    assert len(kernel.standard) == 1 and kernel.compiled.calls == []
    _, args, kwargs = kernel.standard[0]
    assert args == (x1, weight, y1, 7) and kwargs == {"EVEN": True, "BLOCK": 64, "num_warps": 4}

    x2, y2 = torch.ones(2), torch.ones(3)
    cache.run("k", x2, y2, lambda: pytest.fail("make() called on a replay"), stream=12)
    assert len(kernel.standard) == 1 and (cache.launches, cache.replays) == (1, 1)
    (call,) = kernel.compiled.calls
    assert call[:9] == (3, 2, 1, 12, "fn-handle", "meta", None, None, None)
    # the arguments in signature order, constexprs by name; tensors as addresses, this call's x and y
    assert call[9:] == (x2.data_ptr(), weight.data_ptr(), y2.data_ptr(), 7, 64, True)
    assert cache.replay("k", x1, y1, stream=13) and kernel.compiled.calls[-1][9] == x1.data_ptr()
    assert not cache.replay("other", x1, y1, stream=13)  # nothing recorded: nothing done
    assert len(kernel.compiled.calls) == 2


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


def test_the_launch_keeps_its_fixed_tensors_alive():
    """The replay holds the weight's address, not the weight: the entry keeps the tensor itself, so the
    memory at that address is never freed and reused while the launch can be replayed."""
    kernel, cache = FakeKernel(), LaunchCache()
    weight = torch.zeros(4)
    ref = weakref.ref(weight)
    x, y = torch.zeros(2), torch.zeros(3)
    cache.run("k", x, y, _make(kernel, weight, x, y), stream=0)
    del weight
    kernel.standard.clear()  # the stand-in's record of the standard launch
    assert ref() is not None
    cache.clear()
    assert ref() is None


class FakeLauncher:
    """Triton's ``CudaLauncher``: its C entry point ``launch`` and what ``__call__`` passes it."""

    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, scratch: int) -> None:
        self.global_scratch_size = self.profile_scratch_size = scratch
        self.direct: list[tuple] = []
        self.through_call: list[tuple] = []

    def launch(self, *args) -> None:
        self.direct.append(args)

    def __call__(self, *args) -> None:
        self.through_call.append(args)


@pytest.mark.parametrize("scratch", [0, 128])
def test_a_kernel_without_scratch_is_launched_through_the_c_entry_point(scratch):
    kernel, weight, cache = FakeKernel(), torch.zeros(4), LaunchCache()
    launcher = kernel.compiled.run = FakeLauncher(scratch)
    x, y = torch.zeros(2), torch.zeros(3)
    cache.run("k", x, y, _make(kernel, weight, x, y), stream=0)
    assert cache.replay("k", x, y, stream=5)
    kernel_args = (x.data_ptr(), weight.data_ptr(), y.data_ptr(), 7, 64, True)
    if scratch:  # the launcher allocates scratch memory: through its own __call__
        assert launcher.direct == [] and launcher.through_call == [
            (3, 2, 1, 5, "fn-handle", "meta", None, None, None, *kernel_args)
        ]
    else:  # what CudaLauncher.__call__ passes: cooperative, pdl, no scratch pointers
        assert launcher.through_call == [] and launcher.direct == [
            (3, 2, 1, 5, "fn-handle", False, True, None, None, "meta", None, None, None, *kernel_args)
        ]


def test_gemv_launch_names_every_argument_of_the_kernel():
    """The launch the gemv and dot wrappers describe binds every kernel parameter exactly once, and every
    per-call object starts where x or out starts (what a replay fills in)."""
    from offload_runtime.native import fused12_format as fmt
    from offload_runtime.native.fused12_dot_kernel import DotConfig, dot_launch
    from offload_runtime.native.fused12_gemv_kernel import GemvConfig, gemv_launch

    planes = fmt.encode((torch.randn(40, 64) * 0.02).bfloat16())
    x = torch.randn(3, 64).bfloat16()
    y = torch.empty(3, 40, dtype=torch.bfloat16)
    for launch in (
        gemv_launch(x, planes, y, None, GemvConfig()),
        dot_launch(x, planes, y, None, DotConfig()),
    ):
        names = launch.kernel.arg_names
        assert len(launch.full_args()) == len(names)
        assert set(launch.constexprs) == set(names[len(launch.args) :])
        assert launch.per_call[0] is x and launch.per_call[-1] is y
        assert all(any(a is obj for a in launch.args) for obj in launch.per_call)
        assert all(obj.data_ptr() in (x.data_ptr(), y.data_ptr()) for obj in launch.per_call)


def test_objects_derived_per_call_take_this_calls_address():
    """A per-call object the launch derives from x (gemv's 8-byte word view of x) gets this call's address,
    not the first call's: the bug that made replays read a stale x."""
    kernel, cache = FakeKernel(), LaunchCache()

    def make_for(x, y):
        def make():
            words = x.view(torch.int32)  # the launch builds its own view, as gemv_launch does
            return Launch(kernel, (1,), (x, words, y, 7), {"EVEN": True, "BLOCK": 64}, per_call=(x, words, y))

        return make

    x1, y1 = torch.zeros(2), torch.zeros(3)
    cache.run("k", x1, y1, make_for(x1, y1), stream=0)
    x2, y2 = torch.ones(2), torch.ones(3)
    cache.run("k", x2, y2, make_for(x2, y2), stream=0)
    (call,) = kernel.compiled.calls
    assert call[9:12] == (x2.data_ptr(), x2.data_ptr(), y2.data_ptr())


def test_a_per_call_object_elsewhere_is_never_replayed():
    """A per-call object that starts at neither x nor out (a slice past x's start) has no address a replay
    could give: the key stays unrecorded and every call takes the standard launch."""
    kernel, cache = FakeKernel(), LaunchCache()

    def make_for(x, y):
        def make():
            tail = x[1:]
            return Launch(kernel, (1,), (x, tail, y, 7), {"EVEN": True, "BLOCK": 64}, per_call=(x, tail, y))

        return make

    x, y = torch.zeros(4), torch.zeros(3)
    for _ in range(3):
        cache.run("k", x, y, make_for(x, y), stream=0)
    assert len(kernel.standard) == 3 and len(cache) == 0 and kernel.compiled.calls == []
