"""``verify_container``: every chunk read, every CRC-32 checked, every damaged group reported."""

from pathlib import Path

import pytest
import torch

from offload_runtime.errors import CodecUnavailableError, CorruptCheckpointError
from offload_runtime.loaders import ContainerReader, pack
from offload_runtime.loaders.verify_container import verify_container
from offload_runtime.tiny import tiny_model

CORPUS = Path(__file__).parent / "corpus"


@pytest.fixture
def container(tmp_path):
    model = tiny_model("llama", vocab_size=16384)  # 4 MiB embeddings: four 1 MiB chunks
    return pack(model, tmp_path / "c.safetensors", codec="zstd", progress=False)


def _flip(path: Path, group_index: int, chunk: int, granularity: str = "block") -> str:
    """Flip one payload byte inside ``chunk`` of the ``group_index``-th group (a stored group: ``granularity``
    ``"expert"`` for a mixture of experts); returns the group's name."""
    with ContainerReader(path, granularity=granularity) as reader:
        entry = reader.groups[group_index]
        offset = reader._offsets[entry.name] + entry.chunks[chunk].offset + entry.chunks[chunk].size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    return entry.name


def test_a_sound_container_is_read_and_decoded_in_full(container):
    report = verify_container(container, progress=False)
    with ContainerReader(container) as reader:
        assert [g.name for g in report.groups] == [g.name for g in reader.groups]
        assert report.stored_bytes == sum(g.stored_size for g in reader.groups)
    assert report.ok and not report.not_decoded
    assert all(g.decoded_on == "cpu" for g in report.groups)


def test_every_damaged_group_is_reported_with_its_chunk(container):
    first = _flip(container, 0, 3)  # the embeddings have several chunks
    second = _flip(container, 2, 0)
    report = verify_container(container, progress=False)
    damaged = {g.name: g.error for g in report.damaged}
    assert set(damaged) == {first, second}
    assert damaged[first].chunk == 3 and damaged[second].chunk == 0
    assert all(isinstance(e, CorruptCheckpointError) and e.file == str(container) for e in damaged.values())
    assert (
        sum(g.decoded_on == "cpu" for g in report.groups) == len(report.groups) - 2
    )  # the rest still checked


def test_a_forged_compressed_crc_is_caught_by_the_decoded_crc():
    report = verify_container(CORPUS / "flipped_byte_forged_crc_raw.ort", progress=False)
    assert len(report.damaged) == 1
    assert "decoded chunk CRC-32 mismatch" in str(report.damaged[0].error)


def _without_a_cpu_decoder(monkeypatch, gpu_reason: str | None) -> None:
    """Make ``zstd`` look like ``ans`` (no CPU decoder), with a GPU (``gpu_reason`` None) or without."""
    from offload_runtime.native import zstd

    def no_cpu_decoder(self, *args, **kwargs):
        raise CodecUnavailableError("no CPU decoder", codec="zstd", missing="a CPU decoder")

    monkeypatch.setattr(zstd.ZstdCodec, "decodes_on_cpu", lambda self, params: False)
    monkeypatch.setattr(zstd.ZstdCodec, "decode_cpu", no_cpu_decoder)
    monkeypatch.setattr(
        "offload_runtime.native.availability.gpu_codecs_unavailable_reason", lambda: gpu_reason
    )


def test_groups_without_a_decoder_here_are_reported_not_decoded(container, monkeypatch):
    _without_a_cpu_decoder(monkeypatch, "CUDA is not available")
    report = verify_container(container, progress=False)
    assert report.ok and len(report.not_decoded) == len(report.groups)
    assert (
        report.not_decoded[0].not_decoded_reason
        == "codec 'zstd' has no CPU decoder and CUDA is not available"
    )


def test_compressed_crcs_are_checked_even_when_nothing_decodes(container, monkeypatch):
    _without_a_cpu_decoder(monkeypatch, "no GPU")
    name = _flip(container, 1, 0)
    report = verify_container(container, progress=False)
    assert [g.name for g in report.damaged] == [name]


@pytest.fixture
def moe_container(tmp_path):
    """A mixture of experts: each block with its experts is one reassembled group of several parts."""
    return pack(tiny_model("mixtral"), tmp_path / "moe.ort", codec="zstd", progress=False, device="cpu")


def test_the_gpu_is_handed_every_part_of_a_reassembled_group(moe_container, monkeypatch):
    from offload_runtime.loaders import verify_container as verify_module

    handed: dict[str, torch.Tensor] = {}

    def record(reader, entry, payload):
        handed[entry.name] = payload[: entry.stored_size].clone()

    _without_a_cpu_decoder(monkeypatch, None)
    monkeypatch.setattr(verify_module, "_decode_on_gpu", record)
    report = verify_container(moe_container, progress=False)
    assert report.ok and {g.decoded_on for g in report.groups} == {"cuda"}
    with ContainerReader(moe_container) as reader:
        assert any(g.codec == "reassembled" for g in reader.groups)
        for entry in reader.groups:
            expected = reader.read_into(entry.name, torch.empty(entry.stored_size, dtype=torch.uint8))
            for c in entry.chunks:  # what a decoder reads (parts are aligned: the gaps are never read)
                span = slice(c.offset, c.offset + c.size)
                assert torch.equal(handed[entry.name][span], expected[span]), (entry.name, c.offset)


def test_every_part_of_a_reassembled_group_is_crc_checked_when_nothing_decodes(moe_container, monkeypatch):
    name = _flip(moe_container, 3, 0, granularity="expert")
    assert name == "model.layers.0.mlp.experts.1"  # a part after its block's own and another expert
    _without_a_cpu_decoder(monkeypatch, "no GPU")
    report = verify_container(moe_container, progress=False)
    assert [g.error.group for g in report.damaged] == [name]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_ans_groups_are_decoded_and_checked_on_the_gpu(tmp_path, arch):
    """A mixture of experts' blocks are reassembled groups of ans parts: each is decoded whole."""
    path = pack(tiny_model(arch, dtype=torch.bfloat16), tmp_path / "ans.ort", codec="ans", progress=False)
    report = verify_container(path, progress=False)
    assert report.ok and not report.not_decoded
    assert {g.decoded_on for g in report.groups if g.codec in ("ans", "reassembled")} == {"cuda"}
    name = _flip(path, 3, 0, granularity="expert")  # mixtral: the second expert of the first block
    report = verify_container(path, progress=False)
    assert [(g.error.group, g.error.chunk) for g in report.damaged] == [(name, 0)]
