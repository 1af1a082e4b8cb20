"""accelerate hooks and offload_runtime's hooks compose, in either order, through generate and removal."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

from offload_runtime import dispatch_compressed, remove_offload
from offload_runtime.tiny import tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


class ScaleOutput(ModelHook):
    """A hook with an effect that shows in the logits (the block's hidden states are scaled) and a count."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def post_forward(self, module, output):
        self.calls += 1
        if isinstance(output, tuple):
            return (output[0] * 1.5, *output[1:])
        return output * 1.5


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def tokens(model) -> torch.Tensor:
    return model.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.fixture
def reference():
    model = tiny_model("llama", num_layers=4)
    hooked = copy.deepcopy(model)
    add_hook_to_module(hooked.model.layers[1], ScaleOutput())
    return model, logits(hooked), tokens(hooked), logits(model)


@pytest.mark.parametrize("order", ["accelerate first", "offload first"])
def test_accelerate_hook_keeps_working_through_generate_and_remove(reference, order):
    model, want_logits, want_tokens, plain_logits = reference
    assert not torch.equal(want_logits, plain_logits)  # the hook has an effect we can see
    block = model.model.layers[1]
    hook = ScaleOutput()
    budget = 0.0005  # streams the blocks
    if order == "accelerate first":
        add_hook_to_module(block, hook)
        dispatch_compressed(model, budget, device="cpu", codec="zstd")
    else:
        dispatch_compressed(model, budget, device="cpu", codec="zstd")
        add_hook_to_module(block, hook)
    assert model.offload_plan.placement("model.layers.1").streamed
    assert torch.equal(logits(model), want_logits)
    assert torch.equal(tokens(model), want_tokens)
    assert hook.calls > 0
    remove_offload(model)
    calls = hook.calls
    assert torch.equal(logits(model), want_logits)  # the accelerate hook survives remove_offload
    assert hook.calls == calls + 1
    remove_hook_from_module(block)
    assert torch.equal(logits(model), plain_logits)  # and removing it leaves the plain model
