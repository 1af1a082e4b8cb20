"""Codecs: CPU reference codecs and nvCOMP bindings (installed as ``offload_runtime.native``).

Use :func:`get_codec` to get a codec by name; every codec implements
:class:`~offload_runtime.native.base.GroupCodec`.
"""

from __future__ import annotations

from offload_runtime.errors import CodecUnavailableError
from offload_runtime.native import raw as _raw  # noqa: F401  (registers "raw")
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
]


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
