"""Byte layout of a decoded group: which tensor lives at which offset of one flat uint8 buffer.

A group (one transformer block, the embeddings, ...) is decoded into one contiguous byte buffer, a
*slot*; the module's parameters then become zero-copy views of that buffer. Offsets are aligned to
:data:`TENSOR_ALIGN` bytes so every view is aligned for its dtype and for vectorised GPU access.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

TENSOR_ALIGN = 256

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The stored name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored; supported: {sorted(_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a stored dtype name; ``KeyError`` for an unknown one."""
    return _DTYPES[name]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (``b > 0``), exact at any size (no float)."""
    return -(-a // b)


def align_up(value: int, alignment: int) -> int:
    return cdiv(value, alignment) * alignment


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a group: its name, dtype (stored name), shape, and byte offset in the decoded group."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}

    @classmethod
    def from_json(cls, obj: Mapping) -> TensorSpec:
        return cls(
            str(obj["name"]), str(obj["dtype"]), tuple(int(d) for d in obj["shape"]), int(obj["offset"])
        )


@dataclass(frozen=True)
class GroupLayout:
    """The tensors of one group and the total decoded size of the group's byte buffer."""

    tensors: tuple[TensorSpec, ...]
    size: int

    @classmethod
    def from_tensors(cls, named: Iterable[tuple[str, torch.Tensor]]) -> GroupLayout:
        """Lay tensors out back to back, each offset aligned to :data:`TENSOR_ALIGN`, in the given order."""
        return cls.from_shapes((name, tensor.dtype, tensor.shape) for name, tensor in named)

    @classmethod
    def from_shapes(cls, rows: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> GroupLayout:
        """:meth:`from_tensors` of ``(name, dtype, shape)`` rows: no tensor needed, not even on ``meta``."""
        specs, offset = [], 0
        for name, dtype, shape in rows:
            spec = TensorSpec(name, dtype_name(dtype), tuple(shape), offset)
            specs.append(spec)
            offset = align_up(offset + spec.nbytes, TENSOR_ALIGN)
        return cls(tuple(specs), offset)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def spec(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def element_size(self) -> int:
        """The element size shared by all tensors (2 for an all-bf16 group), or 1 when they differ."""
        sizes = {t.torch_dtype.itemsize for t in self.tensors if t.numel}
        return sizes.pop() if len(sizes) == 1 else 1

    def pack(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Copy ``tensors`` (any device, contiguous or not) into a new zero-padded uint8 array of ``size``."""
        out = np.zeros(self.size, dtype=np.uint8)
        buf = torch.from_numpy(out)
        for spec, view in zip(self.tensors, self.views(buf).values(), strict=True):
            src = tensors[spec.name]
            if tuple(src.shape) != spec.shape or src.dtype != spec.torch_dtype:
                raise ValueError(
                    f"tensor {spec.name!r} is {src.dtype} {tuple(src.shape)}, "
                    f"layout says {spec.dtype} {spec.shape}"
                )
            view.copy_(src.detach())
        return out

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-copy typed views of each tensor inside a uint8 ``buffer`` of at least ``size`` bytes."""
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < self.size:
            raise ValueError(
                f"need a 1-D uint8 buffer of >= {self.size} bytes, got {buffer.dtype} {tuple(buffer.shape)}"
            )
        return {t.name: _view(buffer, t) for t in self.tensors}

    def to_json(self) -> dict:
        return {"size": self.size, "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, obj: Mapping) -> GroupLayout:
        return cls(tuple(TensorSpec.from_json(t) for t in obj["tensors"]), int(obj["size"]))


def _view(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    if spec.nbytes == 0:  # an empty slice cannot be re-viewed as another dtype; it holds no data anyway
        return torch.empty(spec.shape, dtype=spec.torch_dtype, device=buffer.device)
    return buffer[spec.offset : spec.offset + spec.nbytes].view(spec.torch_dtype).view(spec.shape)


def total_size(layouts: Sequence[GroupLayout]) -> int:
    return sum(layout.size for layout in layouts)
