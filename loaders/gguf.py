"""GGUF files in: the model and tokenizer through transformers' GGUF loading, for ``pack``.

transformers reads a GGUF file with the ``gguf`` package and de-quantises every quantised tensor (Q4_1,
Q8_0, ...) to the dtype asked for; ``pack`` then stores those de-quantised weights losslessly. The
container is therefore lossless relative to the de-quantised weights (what transformers runs) and larger
than the GGUF file: offload_runtime's codecs do not keep GGUF's quantisation. Unlike safetensors sources,
which are read group by group, the whole de-quantised model is held in host RAM while it is packed.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path

import torch

from offload_runtime.errors import CheckpointError

GGUF_DEFAULT_DTYPE = torch.float32  # every GGUF quantisation de-quantises exactly into float32


def load_gguf(path: Path, dtype: torch.dtype | None = None, progress: bool = True):
    """The model (on the CPU, in eval mode) and tokenizer stored in GGUF file ``path``.

    Args:
        path (`Path`): the GGUF file.
        dtype (`torch.dtype`, *optional*): what quantised tensors are de-quantised to (float32 when None).
        progress (`bool`, defaults to `True`): show transformers' de-quantisation progress bar.

    Raises:
        CheckpointError: the ``gguf`` package is missing, or transformers cannot read this GGUF file (an
            architecture it does not support, a damaged file), with its reason.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "dtype": dtype or GGUF_DEFAULT_DTYPE}
    try:  # transformers that can keep GGUF blocks packed: ask for plain dense weights
        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always de-quantise
        pass
    try:
        with contextlib.ExitStack() as stack:
            if not progress:  # transformers draws its de-quantisation bar with plain tqdm on stderr
                stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
            try:
                model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc):
                    raise
                model = AutoModel.from_pretrained(path.parent, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as exc:
        raise CheckpointError(
            f"reading a GGUF file needs the gguf package ({exc})", file=path, hint="pip install gguf"
        ) from exc
    except Exception as exc:  # the GGUF parser's errors are many (struct.error on a truncated file, ...)
        raise CheckpointError(
            f"transformers cannot load this GGUF file: {type(exc).__name__}: {exc}",
            file=path,
            hint="check that transformers supports its architecture and that the file is complete",
        ) from exc
    packed = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if packed:  # GGUF blocks kept quantised (uint8 storage): not the weights transformers computes with
        raise CheckpointError(
            "transformers kept this GGUF file's quantised blocks packed instead of de-quantising them",
            file=path,
            actual=", ".join(packed),
            hint="use a transformers version whose GgufConfig accepts dequantize=True, or one that always "
            "de-quantises",
        )
    return model.eval(), tokenizer
