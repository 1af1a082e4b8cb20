"""The ``fused12`` reference: every bf16 bit pattern decodes to itself; planes are what kernels expect."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.native import fused12_format as fmt

SPECIAL_BITS = [
    0x0000,  # +0
    0x8000,  # -0
    0x7F80,  # +inf
    0xFF80,  # -inf
    0x7FC0,  # quiet NaN
    0xFFC1,  # negative NaN with a payload
    0x7F81,  # signalling NaN
    0x0001,  # smallest subnormal
    0x807F,  # largest negative subnormal
    0x0080,  # smallest normal
    0x7F7F,  # largest finite
    0x3C00,  # 2**-7, a typical weight exponent
]


def _bf16(bits: list[int], rows: int, cols: int) -> torch.Tensor:
    values = torch.tensor(bits, dtype=torch.int32)
    return (
        (values - (values >= 1 << 15).int() * (1 << 16)).to(torch.int16).view(torch.bfloat16).view(rows, cols)
    )


def _round_trip(weight: torch.Tensor) -> fmt.Planes:
    planes = fmt.encode(weight)
    fmt.check(planes)
    assert torch.equal(fmt.decode(planes).view(torch.int16), weight.view(torch.int16))
    assert torch.equal(fmt.checked_decode(planes).view(torch.int16), weight.view(torch.int16))
    return planes


# a weight-like exponent most of the time, any pattern or a special value otherwise
_bits = st.one_of(
    st.integers(0x3A00, 0x3D7F) | st.integers(0xBA00, 0xBD7F),
    st.integers(0, 0xFFFF),
    st.sampled_from(SPECIAL_BITS),
)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), rows=st.integers(0, 9), cols=st.integers(0, 37))
def test_every_bit_pattern_decodes_to_itself(data, rows, cols):
    bits = data.draw(st.lists(_bits, min_size=rows * cols, max_size=rows * cols))
    _round_trip(_bf16(bits, rows, cols))


def test_all_65536_patterns_round_trip():
    planes = _round_trip(_bf16(list(range(1 << 16)), 256, 256))
    exponents = (torch.arange(1 << 16) >> 7) & 0xFF
    assert planes.escapes >= int(((exponents == 0) | (exponents == 255)).sum())


def test_specials_are_escapes_and_weights_are_not():
    weight = (torch.randn(8, 40) * 0.02).bfloat16()
    weight.view(-1)[: len(SPECIAL_BITS)] = _bf16(SPECIAL_BITS, 1, len(SPECIAL_BITS)).view(-1)
    planes = _round_trip(weight)
    cols = planes.escape_cols().tolist()
    rows = planes.escape_rows().tolist()
    # row 0 holds the specials; 2**-7 (0x3C00) and the largest finite value may fit a window, the rest cannot
    must_escape = [i for i, b in enumerate(SPECIAL_BITS) if ((b >> 7) & 0xFF) in (0, 255)]
    assert set(must_escape) <= {c for r, c in zip(rows, cols, strict=True) if r == 0}
    assert all(r == 0 for r in rows[: len(must_escape)])


def test_window_is_chosen_per_row():
    weight = torch.cat([torch.randn(4, 64) * 1e-3, torch.randn(4, 64) * 10]).bfloat16()
    planes = _round_trip(weight)
    top = planes.top.long()
    assert (top[4:] - top[:4]).min() >= 10  # rows 4x larger in magnitude get a window ~13 exponents higher
    assert planes.escapes == 0


def test_random_normal_weights_are_1_33x_smaller():
    weight = (torch.randn(512, 1024) * 0.02).bfloat16()
    planes = _round_trip(weight)
    assert weight.numel() * 2 / planes.nbytes >= 1.32
    assert fmt.escape_fraction(planes) < 5e-4


def test_scaled_weight_is_the_weight_over_a_power_of_two():
    weight = (torch.randn(16, 50) * 0.02).bfloat16()
    weight[3, 7] = 0.0
    weight[5, 9] = float("nan")
    planes = _round_trip(weight)
    scaled, scale = fmt.scaled_weight(planes)
    escaped = torch.zeros(16, 50, dtype=torch.bool)
    escaped[planes.escape_rows(), planes.escape_cols()] = True
    assert escaped[3, 7] and escaped[5, 9]
    assert torch.equal((scaled * scale[:, None])[~escaped], weight.float()[~escaped])
    assert torch.all(scaled[escaped] == 2.0**-15)  # what the kernels multiply an escape by
    assert torch.all((scaled[~escaped].abs() >= 2.0**-14) & (scaled[~escaped].abs() < 2.0))


def test_layout_pitch_and_sizes():
    assert fmt.pitch_words(1) == 4 and fmt.pitch_words(16) == 4 and fmt.pitch_words(17) == 8
    sizes = fmt.plane_nbytes(7, 17, 3)
    assert sizes == {"sm": 7 * 8 * 4, "codes": 4 * 8 * 4, "top": 7, "esc_ptr": 8 * 4, "esc": 3 * 4}
    planes = fmt.encode(torch.zeros(7, 17, dtype=torch.bfloat16))
    assert planes.escapes == 7 * 17  # zeros are escapes
    assert {n: t.numel() * t.element_size() for n, t in planes.planes().items()} == fmt.plane_nbytes(
        7, 17, 119
    )


def test_refuses_what_it_cannot_encode():
    with pytest.raises(ValueError, match="2-D bfloat16"):
        fmt.encode(torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D bfloat16"):
        fmt.encode(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="65536 columns"):
        fmt.encode(torch.zeros(1, fmt.MAX_COLS + 1, dtype=torch.bfloat16))


def _planes_with_escapes() -> fmt.Planes:
    weight = (torch.randn(6, 24) * 0.02).bfloat16()
    weight[1, 3] = 0.0
    weight[4, 20] = float("inf")
    return fmt.encode(weight)


def _corrupt(edit) -> fmt.Planes:
    planes = _planes_with_escapes()
    edit(planes)
    return planes


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.top.__setitem__(2, 14), "window out of range"),
        (lambda p: p.esc_ptr.__setitem__(3, 5), "not monotonic"),
        (lambda p: p.esc.__setitem__(0, 24), "column outside"),
        (lambda p: p.esc.__setitem__(0, 2), "disagrees with the code plane"),  # escape moved to column 2
        (lambda p: p.codes.__setitem__((0, 0), p.codes[0, 0] | 0x780), "disagrees with the code plane"),
        (lambda p: p.sm.__setitem__((1, 0), p.sm[1, 0] | 0x7F000000), "non-zero sign/mantissa"),
        (lambda p: setattr(p, "sm", p.sm[:, :1]), "wrong shape"),
    ],
)
@pytest.mark.parametrize("check", [fmt.check, fmt.checked_decode], ids=["check", "checked_decode"])
def test_check_refuses_planes_encode_cannot_write(edit, message, check):
    planes = _corrupt(edit)
    with pytest.raises(CorruptCheckpointError, match=message):
        check(planes)


def test_escapes_sorted_and_unique():
    planes = _planes_with_escapes()
    planes.esc_ptr[2:] += 1  # row 1 claims a repeated entry
    planes.esc = torch.cat([planes.esc[:1], planes.esc[:1], planes.esc[1:]])
    with pytest.raises(CorruptCheckpointError, match="sorted"):
        fmt.check(planes)
