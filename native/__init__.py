"""Codecs: CPU reference codecs and nvCOMP bindings (installed as ``offload_runtime.native``).

Use :func:`get_codec` to get a codec by name, or :func:`resolve_codec` to pick one that can run here
(``"auto"``: nvCOMP ANS for fp16/bf16 groups when CUDA and nvCOMP are present, else zstd); every codec
implements :class:`~offload_runtime.native.base.GroupCodec`. ``fused12`` (lossless 12-bit planes that Triton
kernels compute from, :mod:`~offload_runtime.native.fused12_linear`) is chosen by name only.
"""

from __future__ import annotations

import torch

from offload_runtime.errors import CodecUnavailableError
from offload_runtime.native import ans as _ans  # noqa: F401  (registers "ans")
from offload_runtime.native import fused12 as _fused12  # noqa: F401  (registers "fused12")
from offload_runtime.native import int8 as _int8  # registers "int8"; Int8Codec used below
from offload_runtime.native import raw as _raw  # noqa: F401  (registers "raw")
from offload_runtime.native import zstd as _zstd  # noqa: F401  (registers "zstd")
from offload_runtime.native.availability import NVCOMP_EXTRA_HINT, gpu_codecs_unavailable_reason
from offload_runtime.native.base import Chunk, EncodedGroup, GpuDecoder, GroupCodec, registered_codecs
from offload_runtime.native.layout import GroupLayout, TensorSpec

__all__ = [
    "Chunk",
    "EncodedGroup",
    "GpuDecoder",
    "GroupCodec",
    "GroupLayout",
    "TensorSpec",
    "available_codecs",
    "get_codec",
    "resolve_codec",
]

# dtypes nvCOMP ANS models as 2-byte symbols (data_type "<f2"): 1.45x on trained weights vs 1.07x as bytes
_ANS_DTYPES = frozenset({"float16", "bfloat16"})


def available_codecs() -> list[str]:
    """Names of every registered codec (some may still be unable to run here)."""
    return sorted(registered_codecs())


def get_codec(name: str) -> GroupCodec:
    """The codec registered as ``name``.

    Raises:
        CodecUnavailableError: for an unknown name, listing the known ones.
    """
    cls = registered_codecs().get(name)
    if cls is None:
        raise CodecUnavailableError(
            f"unknown codec {name!r}; known codecs: {', '.join(available_codecs())}",
            codec=name,
            missing="a codec of that name",
            alternative="zstd",
        )
    return cls()


def resolve_codec(
    name: str, layout: GroupLayout | None = None, device: torch.device | str | None = None
) -> GroupCodec:
    """The codec to encode with, checked to be able to run here.

    Args:
        name (`str`): a codec name, or ``"auto"``: ``ans`` when the group is fp16/bf16, CUDA and nvCOMP are
            present and ``device`` is not the CPU; ``zstd`` otherwise.
        layout (`GroupLayout`, *optional*): the group to encode; ``None`` assumes an fp16/bf16 group.
        device (`torch.device` or `str`, *optional*): where the weights will be decoded; ``None`` means
            the GPU when there is one.

    Raises:
        CodecUnavailableError: for an unknown name, or a codec that cannot run here (``ans`` without
            CUDA and nvCOMP, or with ``device="cpu"``), naming what is missing and ``zstd`` instead.
    """
    on_cpu = device is not None and torch.device(device).type == "cpu"
    gpu_reason = "decoding on the CPU (device='cpu')" if on_cpu else gpu_codecs_unavailable_reason()
    if name == "auto":
        half = layout is None or all(t.dtype in _ANS_DTYPES for t in layout.tensors if t.numel)
        return get_codec("ans" if half and gpu_reason is None else "zstd")
    if name == "ans" and gpu_reason is not None:
        missing = "a CPU ANS decoder (nvCOMP has none)" if on_cpu else gpu_reason
        raise CodecUnavailableError(
            "codec 'ans' cannot run here: it encodes and decodes only on a GPU with nvCOMP",
            codec="ans",
            missing=missing,
            alternative="zstd",
            hint=None if on_cpu else NVCOMP_EXTRA_HINT,
        )
    if name == "int8":
        # int8 stores through an inner lossless codec: pick the one that can run where it will decode
        return _int8.Int8Codec(inner="zstd" if gpu_reason is not None else "ans")
    return get_codec(name)
