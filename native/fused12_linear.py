"""``fused_linear``: ``y = x W^T (+ b)`` straight from ``fused12`` planes, the kernel chosen per shape.

Three paths compute the same product of the exact weights with fp32 accumulation; they differ in speed:

* ``"gemv"`` (:mod:`~offload_runtime.native.fused12_gemv_kernel`): FMA kernel for 1 to 8 rows of ``x``;
* ``"wdot"`` (:mod:`~offload_runtime.native.fused12_wdot_kernel`): tensor-core kernel for 1 to 16 rows
  of bf16 ``x``, the decoded weight as the left operand (one decode serves all rows);
* ``"dot"`` (:mod:`~offload_runtime.native.fused12_dot_kernel`): tensor-core tile kernel, any number of
  rows, bf16 ``x``;
* ``"decode"``: exact decode of ``W`` into a scratch bf16 buffer
  (:mod:`~offload_runtime.native.fused12_decode_kernel`), then ``torch.nn.functional.linear`` (cuBLAS).

Which one runs comes from a table measured on the GPU by ``bench/fused_kernels.py`` (``fused12_table.json``
beside this module, or the file named by ``$OFFLOAD_RUNTIME_FUSED12_TABLE``): per weight shape ``(N, K)``,
rows buckets ``m`` with the fastest path and its config; a call takes the smallest bucket ``>= M`` (else the
largest), except that a bucket above 64 rows (prefill) does not serve M <= 64: a measured ``dot`` tile that
covers M rows does, else the default. Shapes the table lacks get :func:`default_choice`: ``gemv`` up to 8 rows
with a split-K that gives the SMs about 4 programs each (``wdot`` in whole waves of split-K for 5 to 8 rows
of a weight of at least 4096 rows), ``dot`` up to 64 rows, ``decode`` above. The choice
depends only on ``(M, N, K, x dtype, device)`` and the table (read once per process), so :func:`cached_choice`
resolves each key once: a model calls ``fused_linear`` per layer per token with a handful of keys.

Split-K partial sums and the decode path's scratch live in buffers kept per (device, stream), grown on demand:
calls on one stream are ordered, so they can share them (the split-K counters are 0 again at the end of every
kernel). The partials of a call never exceed :data:`SPLIT_WORKSPACE_BYTES` (a config that needs more runs
with fewer splits), so a runtime's plan charges the decode scratch of its largest executed weight plus
:func:`split_workspace_bound` (``Fused12Codec.compute_scratch_bytes``). On the CPU every
path is the reference decode + ``torch.nn.functional.linear`` unless ``path`` forces a kernel (Triton's
interpreter runs them there, for tests).

A caller that multiplies by one weight again and again (a bound linear layer: ``compressed_linear``) passes
the weight's :class:`~offload_runtime.native.triton_launch.LaunchCache`: from the second call with the same
rows, dtype, alignments and stream, the compiled kernel is launched directly, without Triton's per-call host
work, which at batch 1 takes longer than the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from offload_runtime.errors import UsageError
from offload_runtime.native import fused12_format as fmt
from offload_runtime.native.fused12_format import Planes
from offload_runtime.native.layout import cdiv
from offload_runtime.native.triton_launch import Launch, LaunchCache

TABLE_ENV = "OFFLOAD_RUNTIME_FUSED12_TABLE"
TABLE_PATH = Path(__file__).with_name("fused12_table.json")
PATHS = ("gemv", "wdot", "dot", "decode")
GEMV_MAX_ROWS = 8
WDOT_MAX_ROWS = 16
DOT_DEFAULT_MAX_ROWS = 64
PROGRAMS_PER_SM = 4  # default split-K target: enough programs in flight to hide HBM latency
# wdot is the default for 5..8 rows of a weight of >= 4096 rows: at M=8 it won every such shape measured on
# the H200, in whole waves of split-K (2026-12-01-h200-fused12-kernels-wdot-waves.json); the GEMV won k/v
WDOT_DEFAULT_MIN_M, WDOT_DEFAULT_MIN_N = 5, 4096
WDOT_RESIDENT_PER_SM = 4  # wdot programs resident per SM at 4 warps (128 registers: ncu, M=8)
SWITCHES = ("escape_program", "prefetch")  # config fields that may be 0
# split-K partial sums one stream's calls share, at most: a config that needs more runs with fewer splits,
# so the plan can charge a bound (split_workspace_bound) instead of whatever a table asks
SPLIT_WORKSPACE_BYTES = 16 << 20
MAX_SPLITS = 128
# a split this short (steps of K per program) gives its block's escapes a program of their own by default:
# the H200 sweep had it 16-30 % faster on k/v projections (2-4 steps), up to 20 % slower at 11-13 steps
ESCAPE_PROGRAM_MAX_STEPS = 8
CHOICE_CACHE = 4096  # keys cached_choice keeps: few weight shapes, but prefill brings many values of M


@dataclass(frozen=True)
class Choice:
    """A path and its config (a dict of the kernel's config dataclass fields; ``None`` for ``decode``)."""

    path: str
    config: dict[str, int] | None = None

    @functools.cached_property
    def key(self) -> tuple:
        """A hashable form (part of a launch cache's key): computed once per choice, and a table's choices
        are kept (:func:`cached_choice`), so not once per call."""
        return self.path, tuple(sorted(self.config.items())) if self.config else None


TABLE_HINT = f"re-measure it with bench/fused_kernels.py, or unset ${TABLE_ENV} for the packaged table"


def _bad_table(summary: str) -> UsageError:
    return UsageError(summary, hint=TABLE_HINT)


def _check_choice(row: Any, where: str) -> Choice:
    if not isinstance(row, dict) or row.get("path") not in PATHS:
        raise _bad_table(f"{where}: 'path' must be one of {PATHS}")
    config = row.get("config")
    if row["path"] == "decode":
        return Choice("decode")
    if not isinstance(config, dict) or not all(
        isinstance(v, int) and (v > 0 or (k in SWITCHES and v == 0)) for k, v in config.items()
    ):
        raise _bad_table(f"{where}: 'config' must map field names to positive integers (switches: 0 or 1)")
    return Choice(row["path"], dict(config))


def parse_table(obj: Any, source: str = "table") -> dict[tuple[int, int], list[tuple[int, Choice]]]:
    """``{(N, K): [(m bucket, choice), ...] sorted by m}`` from the JSON object a benchmark wrote.

    Raises:
        UsageError: for a malformed table (also a ``ValueError``), naming ``source`` and the entry.
    """
    entries = obj.get("entries") if isinstance(obj, dict) else None
    if not isinstance(entries, list):
        raise _bad_table(f"{source}: not a fused12 kernel table (no 'entries' list)")
    table: dict[tuple[int, int], list[tuple[int, Choice]]] = {}
    for i, row in enumerate(entries):
        where = f"{source} entry {i}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), int) and row[k] > 0 for k in "nkm"):
            raise _bad_table(f"{where}: 'n', 'k' and 'm' must be positive integers")
        table.setdefault((row["n"], row["k"]), []).append((row["m"], _check_choice(row, where)))
    for rows in table.values():
        rows.sort(key=lambda item: item[0])
    return table


@functools.lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict[tuple[int, int], list[tuple[int, Choice]]]:
    """The kernel table at ``path`` (default: ``$OFFLOAD_RUNTIME_FUSED12_TABLE``, else the packaged one);
    empty when there is no such file.

    Raises:
        UsageError: the file is not JSON, or not a kernel table (naming the file and the entry).
    """
    path = path or os.environ.get(TABLE_ENV) or str(TABLE_PATH)
    if not Path(path).is_file():
        return {}
    try:
        obj = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad_table(f"{path}: not a fused12 kernel table (not JSON: {exc})") from None
    return parse_table(obj, source=path)


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for any other device: the interpreter's tests)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def auto_split(rows: int, cols: int, block_pairs: int, block_words: int, device: torch.device) -> int:
    """Split-K that gives the SMs about :data:`PROGRAMS_PER_SM` programs, each with >= 4 steps of K."""
    blocks = cdiv((rows + 1) // 2, block_pairs)
    steps = cdiv(cdiv(cols, 4), block_words)
    wanted = cdiv(PROGRAMS_PER_SM * sm_count(device), blocks)
    return max(1, min(wanted, steps // 4))


def default_choice(m: int, rows: int, cols: int, device: torch.device) -> Choice:
    """The path for a shape the table does not list (see the module docstring), for bf16 ``x``."""
    if WDOT_DEFAULT_MIN_M <= m <= GEMV_MAX_ROWS and rows >= WDOT_DEFAULT_MIN_N:
        split = max(1, WDOT_RESIDENT_PER_SM * sm_count(device) // cdiv((rows + 1) // 2, 32))  # whole waves
        return Choice("wdot", {"block_pairs": 32, "block_words": 32, "split": split, "num_warps": 4})
    if m <= GEMV_MAX_ROWS:
        return _gemv_default(rows, cols, device)
    if m <= DOT_DEFAULT_MAX_ROWS:
        block_m = 16 if m <= 16 else 64
        split = auto_split(rows, cols, 32, 16, device) if m <= 16 else 1
        config = {"block_m": block_m, "block_pairs": 32, "block_words": 16, "split": split}
        return Choice("dot", {**config, "num_warps": 4, "num_stages": 2})
    return Choice("decode")


def _gemv_default(rows: int, cols: int, device: torch.device) -> Choice:
    """The GEMV with 32 x 32 words (4.4 instructions/weight, 80 registers on sm_90: SASS report)."""
    split = auto_split(rows, cols, 32, 32, device)
    short = split > 1 and cdiv(cdiv(cols, 4), 32 * split) <= ESCAPE_PROGRAM_MAX_STEPS
    config = {"block_pairs": 32, "block_words": 32, "split": split, "num_warps": 4, "num_stages": 1}
    return Choice("gemv", {**config, "escape_program": int(short)})


def choose(m: int, rows: int, cols: int, x_dtype: torch.dtype, device: torch.device, table=None) -> Choice:
    """The path and config for ``m`` rows of ``x`` times a ``rows x cols`` weight."""
    table = load_table() if table is None else table
    options = table.get((rows, cols)) or []
    bucket, choice = next(((b, c) for b, c in options if b >= m), options[-1] if options else (0, None))
    if bucket > DOT_DEFAULT_MAX_ROWS >= m:
        # the next bucket measured prefill (decode + cuBLAS wins there, at M = 512): between it and the
        # small buckets, a tensor-core tile of the table's that covers M rows, else the default (``dot``).
        # Taking the prefill bucket made a 16-token prompt decode every 70 B weight into a scratch buffer.
        tiles = [c for b, c in options if b < m and c.path == "dot" and c.config.get("block_m", 0) >= m]
        choice = tiles[-1] if tiles else None
    if choice is None:
        choice = default_choice(m, rows, cols, device)
    if (choice.path == "gemv" and m > GEMV_MAX_ROWS) or (choice.path == "wdot" and m > WDOT_MAX_ROWS):
        choice = default_choice(m, rows, cols, device)
    if choice.path in ("dot", "wdot") and x_dtype != torch.bfloat16:  # tensor cores multiply bf16 x only
        choice = _gemv_default(rows, cols, device) if m <= GEMV_MAX_ROWS else Choice("decode")
    return choice


def resolve(m: int, rows: int, cols: int, x_dtype: torch.dtype, device: torch.device) -> Choice:
    """The path :func:`fused_linear` takes when none is forced: the reference decode on the CPU, else
    :func:`choose` from the table."""
    if device.type == "cpu":
        return Choice("decode")
    return choose(m, rows, cols, x_dtype, device)


@functools.lru_cache(maxsize=CHOICE_CACHE)
def cached_choice(m: int, rows: int, cols: int, x_dtype: torch.dtype, device: torch.device) -> Choice:
    """:func:`resolve`, once per key (the lookup takes 0.4 us, resolving 2-4 us, on a CPU core). It reads
    the table once, as :func:`load_table` does: whoever clears that cache to read a new table clears this
    one too."""
    return resolve(m, rows, cols, x_dtype, device)


class _Buffers:
    """Per (device, stream): split-K partials and counters (counters start at 0), decode scratch."""

    def __init__(self) -> None:
        self.partials: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None
        self.scratch: torch.Tensor | None = None

    def workspace(self, need: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.partials is None or self.partials.numel() < need[0]:
            self.partials = torch.empty(max(need[0], 1), dtype=torch.float32, device=device)
        if self.counters is None or self.counters.numel() < need[1]:
            self.counters = torch.zeros(max(need[1], 1), dtype=torch.int32, device=device)
        return self.partials, self.counters

    def weight(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        if self.scratch is None or self.scratch.numel() < rows * cols:
            self.scratch = torch.empty(rows * cols, dtype=torch.bfloat16, device=device)
        return self.scratch[: rows * cols].view(rows, cols)


_BUFFERS: dict[tuple[str, int], _Buffers] = {}


def _buffers(device: torch.device) -> _Buffers:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _BUFFERS:
        _BUFFERS[key] = _Buffers()
    return _BUFFERS[key]


def release_buffers() -> None:
    """Drop every cached workspace and scratch buffer (they are re-made on the next call)."""
    _BUFFERS.clear()


def fused_linear(
    x: torch.Tensor,
    planes: Planes,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    path: str | None = None,
    config: dict[str, int] | None = None,
    launches: LaunchCache | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for the weight ``W [N, K]`` stored as ``planes`` (on ``x``'s device).

    Args:
        x (`torch.Tensor`): ``[..., K]``.
        planes (`Planes`): the weight, e.g. views into a device-resident ``fused12`` payload
            (:func:`offload_runtime.native.fused12.tensor_views`).
        bias (`torch.Tensor`, *optional*): ``[N]``.
        out (`torch.Tensor`, *optional*): ``[..., N]`` of ``x``'s dtype with contiguous rows, written and
            returned (``None`` allocates it).
        path (`str`, *optional*): ``"gemv"``, ``"wdot"``, ``"dot"`` or ``"decode"`` instead of the table's
            choice.
        config (`dict`, *optional*): the kernel config with ``path`` (fields of ``GemvConfig``,
            ``WdotConfig`` or ``DotConfig``); ``None`` takes the table's or the default one.
        launches (`LaunchCache`, *optional*): this weight's compiled launches (one cache per weight: a
            bound linear layer keeps one), replayed without Triton's per-call host work on CUDA.

    Returns:
        `torch.Tensor`: ``[..., N]`` in ``x``'s dtype. Weights are exact; the summation order differs from
        cuBLAS's, so the result is not bitwise that of ``F.linear`` with the decoded weight.
    """
    rows, cols = planes.rows, planes.cols
    if x.shape[-1] != cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {rows} x {cols} takes {cols}")
    key = None
    if launches is not None and path is None and out is None and x.is_cuda:
        # the decode-step path: a fresh contiguous ``y``, and a key that fixes everything the launch
        # depends on (x's shape, strides, dtype and alignment fix the table's choice and Triton's
        # specialisation; ``y``'s follow from them but its alignment, checked rather than assumed)
        index = x.get_device()
        stream = _raw_stream(index)
        y = torch.empty((*x.shape[:-1], rows), dtype=x.dtype, device=x.device)
        key = (
            x.shape, x.stride(), x.dtype, x.data_ptr() % 16, y.data_ptr() % 16, index, stream,
            None if bias is None else bias.data_ptr(),
        )  # fmt: skip
        if launches.replay(key, x, y, stream):
            return y
        out = y
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if key is not None and x2.data_ptr() != x.data_ptr():
        key = None  # x's rows are copied per call: a replay given x's address would read the wrong bytes
    m = x2.shape[0]
    y = torch.empty(m, rows, dtype=x.dtype, device=x.device) if out is None else out.view(m, rows)
    if m == 0:
        return y.view(*lead, rows)
    if path is None:
        choice = cached_choice(m, rows, cols, x.dtype, x.device)
    else:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        choice = Choice(path, config)
    if choice.path == "decode" or launches is None or x.device.type != "cuda":
        _run(choice, x2, planes, bias, y)
    elif key is not None:
        launches.run(key, x2, y, lambda: _launch(choice, x2, planes, bias, y), stream)
    else:  # a forced path or config, a caller's ``out``, copied rows: everything that picks the launch
        stream = _raw_stream(x.get_device())
        key = (
            choice.key, m, x.dtype, x2.data_ptr() % 16, y.data_ptr() % 16, x2.stride(0), y.stride(0),
            None if bias is None else bias.data_ptr(), x.get_device(), stream,
        )  # fmt: skip
        launches.run(key, x2, y, lambda: _launch(choice, x2, planes, bias, y), stream)
    return y.view(*lead, rows)


def _raw_stream(device_index: int) -> int:
    """The handle of the current CUDA stream of a device (without making a ``torch.cuda.Stream``)."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is None:  # not in this torch: the public way
        return torch.cuda.current_stream(device_index).cuda_stream
    return get(device_index)


def _run(choice: Choice, x: torch.Tensor, planes: Planes, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """One call of ``choice``, without a launch cache."""
    device = x.device
    if choice.path != "decode":
        _launch(choice, x, planes, bias, y).run()
        return
    if device.type == "cpu":
        weight = fmt.decode(planes)
    else:
        from offload_runtime.native.fused12_decode_kernel import decode_into

        weight = _buffers(device).weight(planes.rows, planes.cols, device)
        decode_into(planes, weight)
    weight = weight.to(x.dtype)
    if bias is None:  # what F.linear runs (mm / addmm), writing into y
        torch.mm(x, weight.T, out=y)
    else:
        torch.addmm(bias.to(x.dtype), x, weight.T, out=y)


def split_workspace_bound(rows: int) -> int:
    """Bytes of split-K workspace (fp32 partials and int32 counters) a call on a weight of ``rows`` output
    features can take: what :data:`MAX_SPLITS` splits of up to 64 rows of ``x`` need, at most
    :data:`SPLIT_WORKSPACE_BYTES` of partials."""
    partials = min(SPLIT_WORKSPACE_BYTES, 4 * 2 * (MAX_SPLITS + 1) * DOT_DEFAULT_MAX_ROWS * rows)
    return partials + 4 * ((rows + 1) // 2)  # counters: one per row block, at most one per pair


def _fitted(config, need, rows_x: int, planes: Planes):
    """``config`` with a split whose partials fit :data:`SPLIT_WORKSPACE_BYTES` (and at most
    :data:`MAX_SPLITS`): the same product, summed in fewer pieces."""
    split = min(config.split, MAX_SPLITS)
    while (
        split > 1
        and 4 * need(rows_x, planes, dataclasses.replace(config, split=split))[0] > SPLIT_WORKSPACE_BYTES
    ):
        split -= 1
    return config if split == config.split else dataclasses.replace(config, split=split)


def _launch(
    choice: Choice, x: torch.Tensor, planes: Planes, bias: torch.Tensor | None, y: torch.Tensor
) -> Launch:
    """The kernel launch of a ``gemv``, ``wdot`` or ``dot`` choice, its split-K workspace taken from the
    buffers."""
    device = x.device
    if choice.path == "gemv":
        from offload_runtime.native import fused12_gemv_kernel as kernel

        make, launch, default_rows = kernel.GemvConfig, kernel.gemv_launch, 1
    elif choice.path == "wdot":
        from offload_runtime.native import fused12_wdot_kernel as kernel

        make, launch, default_rows = kernel.WdotConfig, kernel.wdot_launch, None
    else:
        from offload_runtime.native import fused12_dot_kernel as kernel

        make, launch, default_rows = kernel.DotConfig, kernel.dot_launch, 16
    fields = choice.config
    if not fields and default_rows is not None:
        fields = default_choice(default_rows, planes.rows, planes.cols, device).config
    config = _fitted(make(**(fields or {})), kernel.workspace_needs, x.shape[0], planes)
    need = kernel.workspace_needs(x.shape[0], planes, config)
    workspace = _buffers(device).workspace(need, device) if config.split > 1 else None
    return launch(x, planes, y, bias, config, workspace)
