"""Run the Triton kernels on the CPU: Triton's interpreter, set up before any kernel module is imported.

Import this module first in a kernel test (``import triton_cpu``): without CUDA it sets
``TRITON_INTERPRET=1`` (``triton.jit`` reads it when a kernel is defined) and mends two gaps of Triton
3.6's interpreter:

* its ``tl.dot`` keeps bf16 operands as raw uint16 bits and would multiply the bits: they are widened to
  fp32 first (exact, so the product is the fp32-accumulated one the GPU computes, up to summation order);
* it turns a scalar (a one-element array) into a loop bound with ``int(array)``, which numpy >= 2.4
  refuses for arrays of one dimension: ``.item()`` instead.

With CUDA it does nothing: the kernels compile for the GPU.
"""

from __future__ import annotations

import os

import torch

INTERPRETED = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"

if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - the test extra installs it
    AVAILABLE = False
else:
    AVAILABLE = True

if AVAILABLE and INTERPRETED:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    _create_dot = interpreter.InterpreterBuilder.create_dot

    def _widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle(
                (handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32
            )
        return handle

    def _create_dot_widened(self, a, b, d, input_precision, max_num_imprecise_acc):
        return _create_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = _create_dot_widened

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_item(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor_item
