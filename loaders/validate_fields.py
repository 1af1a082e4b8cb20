"""Checked reads of the JSON values of an untrusted index, shared by the validators (``validate.py`` and
its ``validate_experts.py`` and ``validate_tp.py``): typed values, sane integers, layouts."""

from __future__ import annotations

import math
from typing import Any

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.loaders.format import MAX_GROUP_DECODED_SIZE
from offload_runtime.native.layout import TENSOR_ALIGN, GroupLayout, TensorSpec, align_up, torch_dtype

MAX_INT = 1 << 62  # any offset or size above this is forged; also keeps sums far from 2**63


def typed(value: Any, kind: type) -> Any:
    """``value`` if it is a ``kind`` (a bool is no int); else a TypeError the caller turns into its error."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r:.40}")
    return value


def _tensor_json(obj: Any) -> Any:
    """Type-check one layout tensor entry before ``TensorSpec.from_json`` (which coerces with int/str)."""
    typed(obj, dict)
    typed(obj["name"], str)
    typed(obj["dtype"], str)
    typed(obj["offset"], int)
    for d in typed(obj["shape"], list):
        typed(d, int)
    return obj


def parse_layout(obj: Any, path: str, group: str, what: str) -> GroupLayout:
    """The layout ``what`` of ``group`` from its JSON ``obj``: typed, sane sizes, known dtypes, and the
    tensors packed exactly as ``GroupLayout.from_tensors`` packs them.

    Raises:
        CorruptCheckpointError: naming the file and group (and tensor).
    """
    try:
        layout = GroupLayout(
            tuple(TensorSpec.from_json(_tensor_json(t)) for t in typed(obj["tensors"], list)),
            sane_int(obj["size"], path, f"{what} size", group),
        )
    except CorruptCheckpointError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(1e999)
        raise CorruptCheckpointError(f"malformed {what} ({exc})", file=path, group=group) from None
    if layout.size > MAX_GROUP_DECODED_SIZE:
        raise CorruptCheckpointError(
            f"{what} size is implausibly large",
            file=path,
            group=group,
            expected=f"<= {MAX_GROUP_DECODED_SIZE}",
            actual=layout.size,
        )
    end = 0
    for spec in layout.tensors:  # stored order: exactly GroupLayout.from_tensors' packing, no gaps
        try:
            torch_dtype(spec.dtype)
        except KeyError:
            raise CorruptCheckpointError(
                f"unknown dtype in {what}", file=path, group=f"{group}/{spec.name}", actual=spec.dtype
            ) from None
        if any(d < 0 or d > MAX_INT for d in spec.shape) or not 0 <= spec.offset <= MAX_INT:
            raise CorruptCheckpointError(
                f"negative or huge shape/offset in {what}",
                file=path,
                group=f"{group}/{spec.name}",
                actual=f"shape {spec.shape} at {spec.offset}",
            )
        # TensorSpec.nbytes multiplies in int64, which wraps ([2**32, 2**32] -> 0): recompute exactly
        nbytes = math.prod(spec.shape) * torch_dtype(spec.dtype).itemsize
        if nbytes > MAX_GROUP_DECODED_SIZE or nbytes != spec.nbytes:
            raise CorruptCheckpointError(
                f"tensor in {what} is implausibly large",
                file=path,
                group=f"{group}/{spec.name}",
                expected=f"<= {MAX_GROUP_DECODED_SIZE} bytes",
                actual=f"shape {spec.shape}",
            )
        if spec.offset != align_up(end, TENSOR_ALIGN):
            # a gap would let a shrunken shape pass as valid (other bytes read as this tensor)
            kind = "overlap" if spec.offset < end else "leave a gap"
            raise CorruptCheckpointError(
                f"tensors {kind} in {what}",
                file=path,
                group=f"{group}/{spec.name}",
                expected=f"offset {align_up(end, TENSOR_ALIGN)}",
                actual=spec.offset,
            )
        end = spec.offset + spec.nbytes
    expected = align_up(end, TENSOR_ALIGN)
    if layout.size != expected:
        raise CorruptCheckpointError(
            f"{what} size disagrees with its tensors' shapes x dtypes",
            file=path,
            group=group,
            expected=expected,
            actual=layout.size,
        )
    return layout


def sane_int(value: Any, path: str, what: str, group: str | None = None, chunk: int | None = None) -> int:
    """``value`` if it is an integer in ``[0, MAX_INT]``, else the error naming what, file, group, chunk."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise CorruptCheckpointError(
            f"{what} is not a sane non-negative integer",
            file=path,
            group=group,
            chunk=chunk,
            expected=f"0 <= {what} <= 2**62",
            actual=value,
        )
    return value
