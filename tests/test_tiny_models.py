import pytest
import torch

from offload_runtime.tiny import tiny_config, tiny_model


def test_tiny_models_run(tiny_arch):
    model = tiny_model(tiny_arch)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        out = model(ids)
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert hidden.shape[:2] == (2, 7) and torch.isfinite(hidden).all()


def test_tiny_models_are_seeded():
    a, b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="unknown tiny architecture 'mamba'"):
        tiny_config("mamba")
