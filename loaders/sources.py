"""Where ``pack`` reads tensors from: a live module, or safetensors files read with ``pread``.

Safetensors files are not mmapped: touched pages of a mapping count in the process's RSS until it is
unmapped, so packing a 100 GB checkpoint through ``safe_open`` would look like (and on some systems be)
a 100 GB resident set. ``pread`` straight into the group buffer keeps only one group in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.loaders.format import MAX_HEADER_SIZE
from offload_runtime.loaders.moe import parse_slice_name

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorSource:
    """Tensors by full name: their dtype and shape without reading, and a copy into a caller's view."""

    def dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        raise NotImplementedError

    def fill(self, name: str, dest: torch.Tensor) -> None:
        """Copy tensor ``name`` into ``dest`` (contiguous, same shape), converting its dtype if needed."""
        raise NotImplementedError

    def fill_slice(self, name: str, index: int, dest: torch.Tensor) -> None:
        """Copy ``tensor[index]`` (a slice along the first dimension) of ``name`` into ``dest``.

        This default reads the whole tensor; sources that can read one slice override it.
        """
        dtype, shape = self.dtype_shape(name)
        whole = torch.empty(shape, dtype=dtype)
        self.fill(name, whole)
        dest.copy_(whole[index])


class ModuleSource(TensorSource):
    """Tensors of an in-memory ``state_dict`` (no copy until :meth:`fill`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self.tensors[name]
        return t.dtype, tuple(t.shape)

    def fill(self, name: str, dest: torch.Tensor) -> None:
        dest.copy_(self.tensors[name].detach())

    def fill_slice(self, name: str, index: int, dest: torch.Tensor) -> None:
        dest.copy_(self.tensors[name].detach()[index])


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


class SafetensorsSource(TensorSource):
    """Tensors of one or more safetensors files (a checkpoint, possibly sharded)."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, _Entry] = {}
        for file in files:
            self.entries.update(_read_index(file))
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self.entries[name]
        return e.dtype, e.shape

    def fill(self, name: str, dest: torch.Tensor) -> None:
        self._read(self.entries[name], dest)

    def fill_slice(self, name: str, index: int, dest: torch.Tensor) -> None:
        """Read only ``tensor[index]``: the slices of a row-major tensor along dim 0 are contiguous."""
        e = self.entries[name]
        step = e.nbytes // e.shape[0]
        self._read(_Entry(e.file, e.dtype, e.shape[1:], e.start + index * step, step), dest)

    def _read(self, e: _Entry, dest: torch.Tensor) -> None:
        if dest.dtype == e.dtype and dest.is_contiguous():
            self._pread(e, dest)
        else:
            tmp = torch.empty(e.shape, dtype=e.dtype)
            self._pread(e, tmp)
            dest.copy_(tmp)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _pread(self, e: _Entry, dest: torch.Tensor) -> None:
        if e.nbytes == 0:
            return
        fd = self._fds.get(e.file)
        if fd is None:
            fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        buffer = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < e.nbytes:
            n = os.preadv(fd, [buffer[done:]], e.start + done)
            if n <= 0:
                raise CorruptCheckpointError("safetensors file is truncated", file=e.file, expected=e.nbytes)
            done += n


class SlicedSource(TensorSource):
    """``source``, plus the slice names of expert groups: ``"<param>[<e>]"`` reads ``param[e]``."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source

    def dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        sliced = parse_slice_name(name)
        if sliced is None:
            return self.source.dtype_shape(name)
        dtype, shape = self.source.dtype_shape(sliced[0])
        return dtype, shape[1:]

    def fill(self, name: str, dest: torch.Tensor) -> None:
        sliced = parse_slice_name(name)
        if sliced is None:
            self.source.fill(name, dest)
        else:
            self.source.fill_slice(*sliced, dest)


def _read_index(file: Path) -> dict[str, _Entry]:
    size = file.stat().st_size
    with open(file, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError("not a safetensors file (too short)", file=file)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_SIZE or 8 + header_len > size:
            raise CorruptCheckpointError("safetensors header length is invalid", file=file, actual=header_len)
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"safetensors header is not JSON: {exc}", file=file) from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CorruptCheckpointError("unsupported safetensors dtype", file=file, group=name, actual=info)
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or data_start + end > size:
            raise CorruptCheckpointError(
                "safetensors tensor offsets are invalid", file=file, group=name, actual=[begin, end]
            )
        entries[name] = _Entry(file, dtype, shape, data_start + begin, end - begin)
    return entries
