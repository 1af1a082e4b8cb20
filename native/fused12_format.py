"""``fused12``: a lossless 12-bit format of bf16 weight matrices, laid out for decoding inside a matmul.

A bf16 weight ``w`` = sign ``s`` (1 bit), exponent ``e`` (8), mantissa ``m`` (7). Weights of a trained
layer occupy a narrow band of exponents, so each row of ``W [N, K]`` (``nn.Linear`` layout) stores

* ``top[r]`` (uint8): the highest exponent of a 15-exponent window ``[top - 14, top]`` chosen per row to
  hold as many of the row's weights as possible (``15 <= top <= 254``: normal numbers only);
* a 4-bit code ``n = top - e`` per weight (``0..14``), or ``n = 15``, an *escape*, for every weight whose
  exponent is outside the window: zeros, subnormals, infinities, NaNs (any payload), outliers;
* the sign and mantissa byte of every weight (``0`` for escapes);
* the escapes themselves, exact, in a sparse side list sorted by (row, column): row pointers
  (``esc_ptr [N + 1]``) and one int32 per escape, its column in the low 16 bits and its bf16 bits in the
  high 16 (so a matrix has at most 65536 columns).

So a weight costs 8 + 4 bits, plus 5 bytes per row and 4 bytes per escape: 1.33x fewer bytes than bf16
when escapes are rare (0.015 % of N(0, 0.02) weights; 0.4 % on SmolLM2, whose Q4 de-quantised weights
hold that many exact zeros). Decoding is exact: every stored weight decodes to its original 16 bits.

Bit layout (what the kernels rely on; ``FORMAT.md`` has the same in prose)
--------------------------------------------------------------------------
Words are 32-bit little-endian. Columns are grouped in fours: word ``j`` of a row covers columns
``4j .. 4j + 3``; rows are padded to ``pitch`` words (a multiple of 4, so rows start 16-byte aligned).

* ``sm [N, pitch]`` int32: word ``j`` of row ``r`` holds ``(s_i, m_i)`` of columns ``4j + i`` at
  ``m0: 0-6, s3: 7, m2: 8-14, s0: 15, m1: 16-22, s2: 23, m3: 24-30, s1: 31``. Masking with
  ``0x807F807F`` leaves the sign and mantissa of columns ``4j, 4j+1`` exactly where a bf16 pair
  (two 16-bit lanes) has them; rotating right by 8 first does the same for ``4j+2, 4j+3``.
* ``codes [ceil(N / 2), pitch]`` int32: word ``j`` of row pair ``p`` holds the 8 codes of rows ``2p``
  (A) and ``2p + 1`` (B), columns ``4j .. 4j + 3``, placed so that ``C``, ``C << 4``, ``C >> 4`` and
  ``rotl(C, 8)``, masked with ``0x07800780``, put the codes of (A: 4j, 4j+1), (A: 4j+2, 4j+3),
  (B: 4j, 4j+1), (B: 4j+2, 4j+3) at bits 7-10 and 23-26: the low 4 bits of a bf16 pair's exponents.
  A kernel therefore decodes two weights with a shift and two three-input logic operations, no byte
  extraction, no table. Padding (columns >= K, row B of an odd N) holds code 15 and ``sm`` 0.
* ``top [N]`` uint8, ``esc_ptr [N + 1]`` int32, ``esc [E]`` int32 (``column | bits << 16``).

The exact decode is ``bits = s << 15 | (top - n) << 7 | m``, then the escapes overwrite their positions.
A matmul kernel instead decodes every weight with the fixed exponent ``127 - n``: ``w' = w * 2**(127 -
top)`` exactly (a power of two), finite for every code; it scales each output row by ``2**(top - 127)``
at the end and adds ``x[c] * (v - 2**(top - 142))`` per escape (an escape decodes as ``+2**-15``, since
its ``sm`` is 0). The weights it multiplies are therefore exact; only the summation order differs from a
matmul of the decoded bf16 matrix.

Everything here is the reference: plain torch, any device, no Triton. Kernels are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.native.layout import align_up, cdiv

WINDOW = 15  # exponents a row's window holds; code 15 is the escape
ESCAPE = 15
MIN_TOP = WINDOW  # window [top - 14, top] must stay inside the normal exponents 1..254
MAX_TOP = 254
WORD_COLUMNS = 4
PITCH_WORDS = 4  # row pitch is a multiple of 4 words: every row starts 16-byte aligned
MAX_COLS = 1 << 16  # an escape's column is 16 bits
# a tensor with more escapes than this is not worth the format (>= 1.5 + 4/32 bytes/weight): stored as is
MAX_ESCAPE_FRACTION = 1 / 32
ENCODE_ROWS = 2048  # rows encoded at once: bounds the temporaries of a 28672 x 8192 weight to a few GB

SM_KEEP = 0x807F807F  # sign + mantissa bits of a bf16 pair
EXP_MASK = 0x07800780  # where a code sits in a bf16 pair (bits 7-10 of each lane)
PLANE_NAMES = ("sm", "codes", "top", "esc_ptr", "esc")
PLANE_DTYPES = {
    "sm": torch.int32,
    "codes": torch.int32,
    "top": torch.uint8,
    "esc_ptr": torch.int32,
    "esc": torch.int32,
}


def pitch_words(cols: int) -> int:
    """Words per stored row of a ``cols``-column weight (4 columns per word, a multiple of 4 words)."""
    return align_up(cdiv(cols, WORD_COLUMNS), PITCH_WORDS)


def plane_shapes(rows: int, cols: int, escapes: int) -> dict[str, tuple[int, ...]]:
    """Shape of each plane of a ``rows x cols`` weight with ``escapes`` escapes."""
    pitch = pitch_words(cols)
    return {
        "sm": (rows, pitch),
        "codes": ((rows + 1) // 2, pitch),
        "top": (rows,),
        "esc_ptr": (rows + 1,),
        "esc": (escapes,),
    }


def plane_nbytes(rows: int, cols: int, escapes: int) -> dict[str, int]:
    """Bytes of each plane (see :func:`plane_shapes`)."""
    out = {}
    for name, shape in plane_shapes(rows, cols, escapes).items():
        numel = 1
        for d in shape:
            numel *= d
        out[name] = numel * PLANE_DTYPES[name].itemsize
    return out


@dataclass
class Planes:
    """One encoded weight: its planes as tensors (any device; views into a payload or owned).

    Attributes:
        rows, cols: the weight's shape ``[N, K]``.
        sm, codes, top, esc_ptr, esc: the planes (see the module docstring).
    """

    rows: int
    cols: int
    sm: torch.Tensor
    codes: torch.Tensor
    top: torch.Tensor
    esc_ptr: torch.Tensor
    esc: torch.Tensor

    @property
    def escapes(self) -> int:
        return int(self.esc.numel())

    def escape_rows(self) -> torch.Tensor:
        """int64 row of each escape (from the row pointers)."""
        ptr = self.esc_ptr.to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.rows, device=ptr.device), ptr[1:] - ptr[:-1])

    def escape_cols(self) -> torch.Tensor:
        return self.esc.to(torch.int64) & 0xFFFF

    def escape_bits(self) -> torch.Tensor:
        """int64 bf16 bits (0..65535) of each escape."""
        return (self.esc.to(torch.int64) >> 16) & 0xFFFF

    @property
    def pitch(self) -> int:
        return pitch_words(self.cols)

    @property
    def device(self) -> torch.device:
        return self.sm.device

    @property
    def nbytes(self) -> int:
        """Stored bytes of all planes (without the alignment between them)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in PLANE_NAMES)

    def planes(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in PLANE_NAMES}

    def to(self, device: torch.device | str) -> Planes:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in PLANE_NAMES:
            moved[name] = moved[name].to(device)
        return Planes(**moved)


def _u32(values: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    values = values & 0xFFFFFFFF
    return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)


def _rotr8(v: torch.Tensor) -> torch.Tensor:
    return (v >> 8) | ((v & 0xFF) << 24)


def _rotl8(v: torch.Tensor) -> torch.Tensor:
    return ((v << 8) & 0xFFFFFFFF) | (v >> 24)


def _pair(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two codes at the exponent's low bits of a bf16 pair's lanes (bits 7-10 and 23-26)."""
    return (lo << 7) | (hi << 23)


def choose_top(exponents: torch.Tensor) -> torch.Tensor:
    """Per row, the ``top`` whose window ``[top - 14, top]`` holds the most exponents (the lowest on a tie).

    Args:
        exponents (`torch.Tensor`): int64 ``[rows, cols]``, values 0..255.
    """
    rows = exponents.shape[0]
    counts = torch.zeros(rows, 256, dtype=torch.int64, device=exponents.device)
    counts.scatter_add_(1, exponents, torch.ones_like(exponents))
    counts[:, 0] = 0  # zeros/subnormals and inf/NaN never fit a window
    counts[:, 255] = 0
    cumulative = torch.cumsum(counts, dim=1)
    tops = torch.arange(MIN_TOP, MAX_TOP + 1, device=exponents.device)
    held = cumulative[:, tops] - cumulative[:, tops - WINDOW]
    return tops[torch.argmax(held, dim=1)]


def encode(weight: torch.Tensor) -> Planes:
    """Encode a bf16 ``[N, K]`` weight (any device) into planes on the same device.

    Raises:
        ValueError: for a tensor that is not a 2-D bf16 matrix.
    """
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.shape[1] > MAX_COLS:
        raise ValueError(
            f"fused12 encodes 2-D bfloat16 weights of <= {MAX_COLS} columns, "
            f"got {weight.dtype} {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    bits = weight.detach().contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    parts = [_encode_rows(bits[r : r + ENCODE_ROWS]) for r in range(0, rows, ENCODE_ROWS)]
    if not parts:
        parts = [_encode_rows(bits)]
    esc_counts = torch.cat([p["esc_count"] for p in parts])
    esc_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(esc_counts, 0, out=esc_ptr[1:])
    return Planes(
        rows=rows,
        cols=cols,
        sm=torch.cat([p["sm"] for p in parts]),
        codes=torch.cat([p["codes"] for p in parts]),
        top=torch.cat([p["top"] for p in parts]),
        esc_ptr=esc_ptr.to(torch.int32),
        esc=torch.cat([p["esc"] for p in parts]),
    )


def _encode_rows(bits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encode rows (int64 bf16 bits ``[R, K]``, R even unless it is the last block)."""
    rows, cols = bits.shape
    device = bits.device
    pitch = pitch_words(cols)
    sign, exponent, mantissa = bits >> 15, (bits >> 7) & 0xFF, bits & 0x7F
    top = choose_top(exponent) if rows else torch.zeros(0, dtype=torch.int64, device=device)
    code = top[:, None] - exponent
    escaped = (code < 0) | (code >= ESCAPE) | (exponent == 0) | (exponent == 255)
    code = torch.where(escaped, ESCAPE, code)
    sign = torch.where(escaped, 0, sign)
    mantissa = torch.where(escaped, 0, mantissa)
    esc_rows, esc_cols = torch.nonzero(escaped, as_tuple=True)  # row-major order
    esc = esc_cols | (bits[esc_rows, esc_cols] << 16)

    padded = (rows + 1) // 2 * 2, pitch * WORD_COLUMNS
    full_code = torch.full(padded, ESCAPE, dtype=torch.int64, device=device)
    full_code[:rows, :cols] = code
    full_s = torch.zeros(padded, dtype=torch.int64, device=device)
    full_m = torch.zeros(padded, dtype=torch.int64, device=device)
    full_s[:rows, :cols] = sign
    full_m[:rows, :cols] = mantissa
    s = full_s[:rows].view(rows, pitch, WORD_COLUMNS)
    m = full_m[:rows].view(rows, pitch, WORD_COLUMNS)
    sm = (
        m[..., 0]
        | (s[..., 3] << 7)
        | (m[..., 2] << 8)
        | (s[..., 0] << 15)
        | (m[..., 1] << 16)
        | (s[..., 2] << 23)
        | (m[..., 3] << 24)
        | (s[..., 1] << 31)
    )
    pairs = padded[0] // 2
    a = full_code[0::2].reshape(pairs, pitch, WORD_COLUMNS)
    b = full_code[1::2].reshape(pairs, pitch, WORD_COLUMNS)
    codes = (
        _pair(a[..., 0], a[..., 1])
        | (_pair(a[..., 2], a[..., 3]) >> 4)
        | (_pair(b[..., 0], b[..., 1]) << 4)
        | _rotr8(_pair(b[..., 2], b[..., 3]))
    )
    return {
        "sm": _u32(sm),
        "codes": _u32(codes),
        "top": top.to(torch.uint8),
        "esc_count": escaped.sum(dim=1),
        "esc": _u32(esc),
    }


def _u16_to_i16(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values >= 1 << 15, values - (1 << 16), values).to(torch.int16)


Fields = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # what unpack_fields returns


def unpack_fields(planes: Planes) -> Fields:
    """``(sign, mantissa, code)`` int64 ``[N, K]`` of every stored position (escapes: 0, 0, 15)."""
    rows, cols, pitch = planes.rows, planes.cols, planes.pitch
    sm = planes.sm.to(torch.int64) & 0xFFFFFFFF
    shifts_m = (0, 16, 8, 24)  # mantissa of column 4j + i sits at bit shifts_m[i]
    shifts_s = (15, 31, 23, 7)
    m = torch.stack([(sm >> sh) & 0x7F for sh in shifts_m], dim=-1).view(rows, pitch * WORD_COLUMNS)
    s = torch.stack([(sm >> sh) & 1 for sh in shifts_s], dim=-1).view(rows, pitch * WORD_COLUMNS)
    c = planes.codes.to(torch.int64) & 0xFFFFFFFF
    words = (c, (c << 4) & 0xFFFFFFFF, c >> 4, _rotl8(c))  # (A lo, A hi, B lo, B hi) pairs of columns
    lanes = [((w >> 7) & 0xF, (w >> 23) & 0xF) for w in words]
    a = torch.stack([lanes[0][0], lanes[0][1], lanes[1][0], lanes[1][1]], dim=-1)
    b = torch.stack([lanes[2][0], lanes[2][1], lanes[3][0], lanes[3][1]], dim=-1)
    code = torch.stack([a, b], dim=1).reshape(2 * c.shape[0], pitch * WORD_COLUMNS)[:rows]
    return s[:, :cols], m[:, :cols], code[:, :cols]


def check(planes: Planes) -> None:
    """Check that the planes are what :func:`encode` writes, so decode and fused matmul agree.

    Shapes, ``top`` in 15..254, row pointers monotonic from 0 to E, escapes sorted, inside the matrix,
    exactly at the code-15 positions, which hold ``sm`` 0.

    Raises:
        CorruptCheckpointError: naming what is wrong (the caller adds file, group and chunk).
    """
    _checked_fields(planes)


def checked_decode(planes: Planes) -> torch.Tensor:
    """:func:`check`, then :func:`decode`, unpacking the planes once (the CPU decode of a payload).

    Raises:
        CorruptCheckpointError: as :func:`check`.
    """
    return _decode(planes, _checked_fields(planes))


def _checked_fields(planes: Planes) -> Fields:
    """:func:`check`'s work; the :func:`unpack_fields` it needed, for a decode to reuse."""
    rows, cols, escapes = planes.rows, planes.cols, planes.escapes
    for name, shape in plane_shapes(rows, cols, escapes).items():
        tensor = getattr(planes, name)
        if tuple(tensor.shape) != shape or tensor.dtype != PLANE_DTYPES[name]:
            raise CorruptCheckpointError(
                f"fused12 plane {name!r} has the wrong shape or dtype",
                expected=f"{PLANE_DTYPES[name]} {shape}",
                actual=f"{tensor.dtype} {tuple(tensor.shape)}",
            )
    top = planes.top.to(torch.int64)
    if rows and (top.min() < MIN_TOP or top.max() > MAX_TOP):
        raise CorruptCheckpointError(
            "fused12 row exponent window out of range",
            expected=f"{MIN_TOP} <= top <= {MAX_TOP}",
            actual=f"{int(top.min())}..{int(top.max())}",
        )
    ptr = planes.esc_ptr.to(torch.int64)
    if int(ptr[0]) != 0 or int(ptr[-1]) != escapes or bool((ptr[1:] < ptr[:-1]).any()):
        raise CorruptCheckpointError(
            "fused12 escape row pointers are not monotonic from 0 to the escape count",
            expected=f"0 .. {escapes}",
            actual=f"{int(ptr[0])} .. {int(ptr[-1])}",
        )
    r, c = planes.escape_rows(), planes.escape_cols()
    if bool((c >= cols).any()):
        raise CorruptCheckpointError(
            "fused12 escape column outside the matrix", expected=f"< {cols}", actual=int(c.max())
        )
    flat = r * cols + c
    if escapes > 1 and bool((flat[1:] <= flat[:-1]).any()):
        raise CorruptCheckpointError("fused12 escapes are not sorted by (row, column) without repeats")
    sign, mantissa, code = unpack_fields(planes)
    marked = torch.zeros(rows * cols, dtype=torch.bool, device=ptr.device)
    marked[flat] = True
    is_escape = (code == ESCAPE).reshape(-1)
    if not torch.equal(marked, is_escape):
        where = int(torch.nonzero(marked != is_escape)[0])
        raise CorruptCheckpointError(
            "fused12 escape list disagrees with the code plane",
            expected="an escape entry exactly where the code is 15",
            actual=f"row {where // cols}, column {where % cols}",
        )
    if bool(((sign | mantissa).reshape(-1)[is_escape] != 0).any()):
        raise CorruptCheckpointError("fused12 escaped positions hold a non-zero sign/mantissa byte")
    return sign, mantissa, code


def decode(planes: Planes) -> torch.Tensor:
    """The exact bf16 ``[N, K]`` weight of ``planes`` (same device), escapes included.

    Positions are decoded as ``s << 15 | (top - n) << 7 | m`` whatever their code, then the escapes
    overwrite theirs: the same total function the GPU decode kernel computes (call :func:`check` first
    to refuse planes :func:`encode` cannot have written, or call :func:`checked_decode`).
    """
    return _decode(planes, unpack_fields(planes))


def _decode(planes: Planes, fields: Fields) -> torch.Tensor:
    sign, mantissa, code = fields
    top = planes.top.to(torch.int64)[:, None]
    bits = (sign << 15) | (((top - code) & 0xFF) << 7) | mantissa
    flat = bits.reshape(-1)
    if planes.escapes:
        flat[planes.escape_rows() * planes.cols + planes.escape_cols()] = planes.escape_bits()
    return _u16_to_i16(flat).view(torch.bfloat16).view(planes.rows, planes.cols)


def scaled_weight(planes: Planes) -> tuple[torch.Tensor, torch.Tensor]:
    """What a fused kernel multiplies: ``(w' fp32 [N, K], scale fp32 [N])`` with ``w = w' * scale`` except at
    escapes, where ``w'`` is ``2**-15`` (reference for the kernels' arithmetic, see the module docstring)."""
    sign, mantissa, code = unpack_fields(planes)
    bits = (sign << 31) | ((127 - code) << 23) | (mantissa << 16)
    scaled = _u32(bits).view(torch.float32)
    scale = torch.exp2(planes.top.to(torch.float32) - 127)
    return scaled, scale


def escape_fraction(planes: Planes) -> float:
    return planes.escapes / max(planes.rows * planes.cols, 1)
