"""ctypes binding of nvCOMP's batched C API (``libnvcomp.so`` from the ``nvidia-libnvcomp-cu12/13`` wheel).

Why not the Python API on the hot path: a ``nvcomp.Codec`` is bound to one CUDA stream at construction,
and while the GPU is busy with GEMMs a further ``decode`` on the same codec blocks the host (~2.7 ms
measured on an H100) holding the GIL. The batched C functions take the stream per call, only enqueue
work, and ctypes releases the GIL around foreign calls. Signatures follow ``include/nvcomp/ans.h``,
``zstd.h`` and ``shared_types.h`` of nvCOMP 6.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from offload_runtime.errors import CodecCallError

NVCOMP_SUCCESS = 0
NVCOMP_TYPE_CHAR = 0
NVCOMP_TYPE_FLOAT16 = 10
NVCOMP_TYPE_BITS = 0xFF  # decompression: read the data type from the bitstream
NVCOMP_RANS = 0
# the smallest address alignment nvCOMP accepts for compressed chunks and decoded outputs of both codecs
ANS_ALIGNMENT = 16  # nvcompANSRequiredDecompressionAlignment / nvcompANSRequiredCompressionAlignment
ZSTD_ALIGNMENT = 8  # nvcompZstdRequiredDecompressionAlignment

_C_NAME = {"ans": "ANS", "zstd": "Zstd"}
_size_t = ctypes.c_size_t
_void_p = ctypes.c_void_p


class AnsCompressOpts(ctypes.Structure):
    """``nvcompBatchedANSCompressOpts_t`` (64 bytes, passed by value)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("data_type", ctypes.c_int),
        ("max_sub_chunk_count", ctypes.c_uint8),
        ("states_per_lane", ctypes.c_uint8),
        ("histogram_reduction_log2", ctypes.c_uint8),
        ("reserved", ctypes.c_char * 53),
    ]


class AnsDecompressOpts(ctypes.Structure):
    """``nvcompBatchedANSDecompressOpts_t`` (64 bytes, passed by value)."""

    _fields_ = [
        ("backend", ctypes.c_int),
        ("data_type", ctypes.c_int),
        ("max_sub_chunk_count", ctypes.c_uint8),
        ("states_per_lane", ctypes.c_uint8),
        ("skip_validate", ctypes.c_uint8),
        ("reserved", ctypes.c_char * 53),
    ]


class ZstdDecompressOpts(ctypes.Structure):
    """``nvcompBatchedZstdDecompressOpts_t`` (64 bytes, passed by value)."""

    _fields_ = [("backend", ctypes.c_int), ("reserved", ctypes.c_char * 60)]


class Crc32Spec(ctypes.Structure):
    """``nvcompCRC32Spec_t`` (32 bytes)."""

    _fields_ = [
        ("poly", ctypes.c_uint32),
        ("init", ctypes.c_uint32),
        ("ref_in", ctypes.c_bool),
        ("ref_out", ctypes.c_bool),
        ("xorout", ctypes.c_uint32),
        ("reserved", ctypes.c_char * 16),
    ]


class Crc32KernelConf(ctypes.Structure):
    """``nvcompCRC32KernelConf_t`` (32 bytes)."""

    _fields_ = [
        ("kernel_kind", ctypes.c_int),
        ("bytes_per_read", ctypes.c_int32),
        ("blocks_per_msg", ctypes.c_int32),
        ("reserved", ctypes.c_char * 20),
    ]


class Crc32Opts(ctypes.Structure):
    """``nvcompBatchedCRC32Opts_t`` (128 bytes, passed by value)."""

    _fields_ = [("spec", Crc32Spec), ("kernel_conf", Crc32KernelConf), ("reserved", ctypes.c_char * 64)]


CRC32_ONLY_SEGMENT = 0  # nvcompCRC32OnlySegment: each chunk is a whole message
# CRC-32/PKZIP, the zlib.crc32 the index stores (nvcompCRC32 in crc32.h)
CRC32_PKZIP = {"poly": 0x04C11DB7, "init": 0xFFFFFFFF, "ref_in": True, "ref_out": True, "xorout": 0xFFFFFFFF}


class NvcompCallError(CodecCallError):
    """An nvCOMP C function returned a status other than ``nvcompSuccess``."""


def _library_candidates() -> list[str]:
    names = ["libnvcomp.so.6", "libnvcomp.so.5", "libnvcomp.so"]
    try:
        import nvidia.libnvcomp as wheel
    except ImportError:
        return names
    roots = [Path(p) for p in getattr(wheel, "__path__", [])]
    found = [str(f) for root in roots for f in sorted((root / "lib64").glob("libnvcomp.so*"))]
    return found + names


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """``libnvcomp.so`` with argument types declared, or ``None`` when it cannot be loaded."""
    for candidate in _library_candidates():
        if "cpu" in Path(candidate).name:
            continue
        try:
            lib = ctypes.CDLL(candidate, ctypes.RTLD_LOCAL)
        except OSError:
            continue
        if _declare(lib):
            return lib
    return None


def _declare(lib: ctypes.CDLL) -> bool:
    try:
        decompress = [
            _void_p,  # const void* const* device_compressed_chunk_ptrs
            _void_p,  # const size_t* device_compressed_chunk_bytes
            _void_p,  # const size_t* device_uncompressed_buffer_bytes
            _void_p,  # size_t* device_uncompressed_chunk_bytes
            _size_t,  # num_chunks
            _void_p,  # device_temp_ptr
            _size_t,  # temp_bytes
            _void_p,  # void* const* device_uncompressed_chunk_ptrs
        ]
        lib.nvcompBatchedANSDecompressAsync.argtypes = [*decompress, AnsDecompressOpts, _void_p, _void_p]
        lib.nvcompBatchedZstdDecompressAsync.argtypes = [*decompress, ZstdDecompressOpts, _void_p, _void_p]
        temp = [_size_t, _size_t]
        lib.nvcompBatchedANSDecompressGetTempSize.argtypes = [
            *temp,
            AnsDecompressOpts,
            ctypes.POINTER(_size_t),
            _size_t,
            _void_p,
        ]
        lib.nvcompBatchedZstdDecompressGetTempSize.argtypes = [
            *temp,
            ZstdDecompressOpts,
            ctypes.POINTER(_size_t),
            _size_t,
            _void_p,
        ]
        lib.nvcompBatchedANSCompressGetTempSize.argtypes = [
            *temp,
            AnsCompressOpts,
            ctypes.POINTER(_size_t),
            _size_t,
            _void_p,
        ]
        lib.nvcompBatchedANSCompressGetMaxOutputChunkSize.argtypes = [
            _size_t,
            AnsCompressOpts,
            ctypes.POINTER(_size_t),
        ]
        lib.nvcompBatchedANSCompressAsync.argtypes = [
            _void_p,  # const void* const* device_uncompressed_chunk_ptrs
            _void_p,  # const size_t* device_uncompressed_chunk_bytes
            _size_t,  # max_uncompressed_chunk_bytes
            _size_t,  # num_chunks
            _void_p,  # device_temp_ptr
            _size_t,  # temp_bytes
            _void_p,  # void* const* device_compressed_chunk_ptrs
            _void_p,  # size_t* device_compressed_chunk_bytes
            AnsCompressOpts,
            _void_p,  # nvcompStatus_t* device_statuses
            _void_p,  # cudaStream_t
        ]
    except AttributeError:
        return False
    for name in (
        "nvcompBatchedANSDecompressAsync",
        "nvcompBatchedZstdDecompressAsync",
        "nvcompBatchedANSDecompressGetTempSize",
        "nvcompBatchedZstdDecompressGetTempSize",
        "nvcompBatchedANSCompressGetTempSize",
        "nvcompBatchedANSCompressGetMaxOutputChunkSize",
        "nvcompBatchedANSCompressAsync",
    ):
        getattr(lib, name).restype = ctypes.c_int
    return True


@functools.lru_cache(maxsize=1)
def crc32_library() -> ctypes.CDLL | None:
    """``libnvcomp.so`` when it has the batched CRC32 API (nvCOMP 5+), else ``None``."""
    lib = library()
    if lib is None:
        return None
    try:
        lib.nvcompBatchedCRC32Async.argtypes = [
            _void_p,  # const void* const* device_input_chunk_ptrs
            _void_p,  # const size_t* device_input_chunk_bytes
            _size_t,  # num_chunks
            _void_p,  # uint32_t* device_crc32_ptr
            Crc32Opts,
            ctypes.c_int,  # nvcompCRC32SegmentKind_t
            _void_p,  # nvcompStatus_t* device_statuses
            _void_p,  # cudaStream_t
        ]
        lib.nvcompBatchedCRC32GetHeuristicConf.argtypes = [
            _void_p,
            _size_t,
            ctypes.POINTER(Crc32KernelConf),
            _size_t,
            _void_p,
        ]
    except AttributeError:
        return None
    lib.nvcompBatchedCRC32Async.restype = ctypes.c_int
    lib.nvcompBatchedCRC32GetHeuristicConf.restype = ctypes.c_int
    return lib


def crc32_opts(num_chunks: int, max_chunk_bytes: int) -> Crc32Opts | None:
    """CRC-32/PKZIP options with nvCOMP's heuristic kernel choice for this batch shape (host-only query),
    or ``None`` when this nvCOMP has no CRC32 API."""
    lib = crc32_library()
    if lib is None or not num_chunks:
        return None
    conf = Crc32KernelConf()
    status = lib.nvcompBatchedCRC32GetHeuristicConf(
        None, num_chunks, ctypes.byref(conf), max_chunk_bytes, None
    )
    check(status, "nvcompBatchedCRC32GetHeuristicConf")
    return Crc32Opts(spec=Crc32Spec(**CRC32_PKZIP), kernel_conf=conf)


def check(status: int, function: str) -> None:
    """Raise :class:`NvcompCallError` naming ``function`` unless ``status`` is ``nvcompSuccess``."""
    if status != NVCOMP_SUCCESS:
        raise NvcompCallError(f"{function} returned nvcompStatus_t {status}")


def ans_compress_opts(data_type: str) -> AnsCompressOpts:
    """Compression options for nvCOMP ``data_type`` ``"<f2"`` (2-byte floats) or ``"|u1"`` (bytes)."""
    return AnsCompressOpts(
        type=NVCOMP_RANS, data_type=NVCOMP_TYPE_FLOAT16 if data_type == "<f2" else NVCOMP_TYPE_CHAR
    )


def ans_decompress_opts() -> AnsDecompressOpts:
    return AnsDecompressOpts(backend=0, data_type=NVCOMP_TYPE_BITS)


def zstd_decompress_opts() -> ZstdDecompressOpts:
    return ZstdDecompressOpts(backend=0)


def decompress_temp_bytes(algorithm: str, num_chunks: int, max_chunk: int, total: int) -> int:
    """GPU scratch bytes one batched decompress of ``num_chunks`` chunks needs (host-only query)."""
    lib = library()
    out = _size_t(0)
    if algorithm == "ans":
        status = lib.nvcompBatchedANSDecompressGetTempSize(
            num_chunks, max_chunk, ans_decompress_opts(), ctypes.byref(out), total, None
        )
    else:
        status = lib.nvcompBatchedZstdDecompressGetTempSize(
            num_chunks, max_chunk, zstd_decompress_opts(), ctypes.byref(out), total, None
        )
    check(status, f"nvcompBatched{_C_NAME[algorithm]}DecompressGetTempSize")
    return int(out.value)
