import pickle

import pytest
import torch

from offload_runtime import errors
from offload_runtime.errors import (
    BudgetError,
    CheckpointError,
    CheckpointMismatchError,
    CodecCallError,
    CodecUnavailableError,
    CorruptCheckpointError,
    DeviceMemoryError,
    ExpertRoutingError,
    MissingFileError,
    OffloadError,
    PlanError,
    UsageError,
)


@pytest.mark.parametrize(
    ("cls", "parents"),
    [
        (CheckpointError, (OffloadError,)),
        (CorruptCheckpointError, (CheckpointError, OffloadError)),
        (CheckpointMismatchError, (CheckpointError, OffloadError)),
        (BudgetError, (OffloadError,)),
        (CodecUnavailableError, (OffloadError,)),
        (DeviceMemoryError, (OffloadError, torch.OutOfMemoryError)),
        (UsageError, (OffloadError, ValueError)),
        (MissingFileError, (UsageError, OffloadError, FileNotFoundError, ValueError)),
        (CodecCallError, (OffloadError, RuntimeError)),
        (PlanError, (OffloadError, RuntimeError)),
        (ExpertRoutingError, (OffloadError,)),
    ],
)
def test_hierarchy(cls, parents):
    for parent in parents:
        assert issubclass(cls, parent)
    assert issubclass(OffloadError, Exception)


def test_message_names_every_field():
    err = CorruptCheckpointError(
        "chunk checksum mismatch",
        file="/m/model.safetensors",
        group="model.layers.3",
        chunk=7,
        expected="crc32=0x1234",
        actual="crc32=0xbeef",
        hint="re-pack the model",
    )
    msg = str(err)
    for needle in (
        "chunk checksum mismatch",
        "/m/model.safetensors",
        "model.layers.3",
        "chunk=7",
        "crc32=0x1234",
        "crc32=0xbeef",
        "re-pack the model",
    ):
        assert needle in msg
    assert (err.file, err.group, err.chunk) == ("/m/model.safetensors", "model.layers.3", 7)


def test_unset_fields_are_not_rendered():
    msg = str(BudgetError("budget too small", expected="1.5 GiB", actual="0.5 GiB"))
    assert "file=" not in msg and "chunk=" not in msg
    assert "expected=1.5 GiB" in msg and "actual=0.5 GiB" in msg


def test_mismatch_lists_every_mismatch():
    err = CheckpointMismatchError(
        "container does not fit the model",
        file="c.safetensors",
        mismatches=["missing: a.weight", "shape of b.weight: (2, 3) vs (3, 2)"],
    )
    lines = str(err).splitlines()
    assert lines[1:] == ["  - missing: a.weight", "  - shape of b.weight: (2, 3) vs (3, 2)"]


def test_codec_unavailable_names_missing_and_alternative():
    err = CodecUnavailableError(
        "codec 'ans' cannot run here", codec="ans", missing="CUDA", alternative="zstd"
    )
    msg = str(err)
    assert "codec=ans" in msg and "missing=CUDA" in msg and "use instead=zstd" in msg


@pytest.mark.parametrize(
    "err",
    [
        CorruptCheckpointError("bad", file="f", group="g", chunk=1, expected=2, actual=3),
        CheckpointMismatchError("bad", file="f", mismatches=["x"]),
        CodecUnavailableError("bad", codec="ans", missing="nvCOMP", alternative="zstd"),
        UsageError("budget_gb must be positive", actual=-1, hint="give e.g. budget_gb=2"),
        MissingFileError("no such file or directory", file="/nope"),
    ],
)
def test_errors_survive_pickling(err):
    # errors cross process boundaries (prefetch workers, multiprocessing tests) with their fields intact
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is type(err) and str(clone) == str(err)


def test_all_is_complete():
    assert set(errors.__all__) == {
        "OffloadError",
        "CheckpointError",
        "CorruptCheckpointError",
        "CheckpointMismatchError",
        "BudgetError",
        "DeviceMemoryError",
        "CodecUnavailableError",
        "UsageError",
        "MissingFileError",
        "CodecCallError",
        "PlanError",
        "ExpertRoutingError",
    }


def test_nvcomp_call_errors_are_codec_call_errors():
    from offload_runtime.native import nvcomp_capi

    assert issubclass(nvcomp_capi.NvcompCallError, CodecCallError)
    with pytest.raises(CodecCallError, match="nvcompBatchedANSDecompressAsync returned nvcompStatus_t 10"):
        nvcomp_capi.check(10, "nvcompBatchedANSDecompressAsync")


def test_a_piece_beyond_the_plan_is_a_plan_error():
    from offload_runtime.scheduler.arena import DeviceArena

    arena = DeviceArena(1024, torch.device("cpu"))
    arena.take(600)  # rounded to 1024: the arena is full
    with pytest.raises(PlanError, match="arena exhausted") as info:
        arena.take(1)
    assert info.value.expected == "<= 1024 bytes in all" and info.value.actual == "1536 bytes"


def test_a_fixed_workspace_cannot_grow():
    from offload_runtime.native.workspace import DecodeWorkspace

    taken = []
    workspace = DecodeWorkspace(
        "cpu", allocate=lambda n: taken.append(n) or torch.empty(n, dtype=torch.uint8)
    )
    workspace.reserve({"nvcomp-ans": 4096})
    workspace._buffer("nvcomp-ans", None)  # what allocate(stream) does per kind, without a CUDA stream
    assert taken == [4096]
    workspace.reserve({"nvcomp-ans": 1000})  # fits: fine
    with pytest.raises(PlanError, match="sized by the plan"):
        workspace.reserve({"nvcomp-ans": 4097})
