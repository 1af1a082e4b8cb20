import pickle

import pytest
import torch

from offload_runtime import errors
from offload_runtime.errors import (
    BudgetError,
    CheckpointError,
    CheckpointMismatchError,
    CodecUnavailableError,
    CorruptCheckpointError,
    DeviceMemoryError,
    MissingFileError,
    OffloadError,
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
    }
