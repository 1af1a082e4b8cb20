"""Verify a container on demand: read every chunk and check every CRC-32.

Opening a container validates its header and index (with the index's own CRC-32) but reads no payload;
the runtime checks each chunk when it first reads it. :func:`verify_container` reads them all now, group
by group in stored order, through the reader's own checks (``verify="always"``):

1. a group whose codec decodes on the CPU (the codec's ``decodes_on_cpu``): ``decode_cpu`` reads the
   payload with ``pread`` and checks the compressed CRC-32 of every chunk, then decodes it and checks every
   chunk's decoded CRC-32 (for ``int8``: of the stored bytes before the transform back);
2. any other (``ans``, ``int8`` over ``ans``, a reassembled group with such a part): ``read_into`` reads
   its whole payload (every part of a reassembled group) and checks every compressed CRC-32; its decode is
   checked on the GPU when CUDA and nvCOMP are present (nvCOMP's statuses, decoded sizes and decoded
   CRC-32s, as the runtime checks it), otherwise it is reported as not decoded, with the reason.

A damaged group is recorded with the typed error naming file, group and chunk, and verification goes on
with the next group, so one run reports every damaged group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offload_runtime.display import ByteBar
from offload_runtime.errors import OffloadError
from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.reader import ContainerReader, locate_error
from offload_runtime.native import get_codec


@dataclass
class GroupCheck:
    """What verification found for one group.

    Attributes:
        name: the group.
        codec: its codec.
        chunks: its chunk count.
        decoded_on: ``"cpu"`` or ``"cuda"`` when its decoded CRC-32s were checked, ``None`` otherwise.
        error: the damage found (naming the chunk), or ``None``.
        not_decoded_reason: why its decode was not checked (no CPU decoder and no GPU), or ``None``.
    """

    name: str
    codec: str
    chunks: int
    decoded_on: str | None = None
    error: OffloadError | None = None
    not_decoded_reason: str | None = None


@dataclass
class VerifyReport:
    """Every group's check, in stored order."""

    path: Path
    groups: list[GroupCheck] = field(default_factory=list)
    stored_bytes: int = 0

    @property
    def damaged(self) -> list[GroupCheck]:
        return [g for g in self.groups if g.error is not None]

    @property
    def not_decoded(self) -> list[GroupCheck]:
        return [g for g in self.groups if g.error is None and g.decoded_on is None]

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify_container(path: str | os.PathLike, *, progress: bool = True) -> VerifyReport:
    """Read every chunk of container ``path`` and check its CRC-32s (compressed, and decoded where a
    decoder runs here).

    Args:
        path (`str` or `os.PathLike`): the container.
        progress (`bool`, defaults to `True`): show a progress bar (MiB read) on stderr.

    Returns:
        `VerifyReport`: per group, where it was decoded, or the damage found, or why it was not decoded.

    Raises:
        CheckpointError: the header or index is not valid (nothing can be read).
    """
    from offload_runtime.native.availability import gpu_codecs_unavailable_reason

    with ContainerReader(path, verify="always") as reader:
        entries = reader.groups
        report = VerifyReport(reader.path, stored_bytes=sum(e.stored_size for e in entries))
        staging = torch.empty(max((e.stored_size for e in entries), default=0), dtype=torch.uint8)
        out = torch.empty(max((e.decoded_size for e in entries), default=0), dtype=torch.uint8)
        gpu_reason = gpu_codecs_unavailable_reason()
        with ByteBar(report.stored_bytes, f"verify {reader.path.name}", enabled=progress) as bar:
            for entry in entries:
                check = GroupCheck(entry.name, entry.codec, len(entry.chunks))
                try:
                    if get_codec(entry.codec).decodes_on_cpu(entry.params):
                        reader.decode_cpu(entry.name, out, staging=staging)
                        check.decoded_on = "cpu"
                    else:
                        payload = reader.read_into(entry.name, staging)  # every compressed CRC checked
                        if gpu_reason is not None:
                            check.not_decoded_reason = (
                                f"codec {entry.codec!r} has no CPU decoder and {gpu_reason}"
                            )
                        else:
                            _decode_on_gpu(reader, entry, payload)
                            check.decoded_on = "cuda"
                except OffloadError as exc:
                    check.error = exc
                report.groups.append(check)
                bar.update(entry.stored_size)
    return report


def _decode_on_gpu(reader: ContainerReader, entry: GroupEntry, payload: torch.Tensor) -> None:
    """Decode ``payload`` (``entry``'s whole payload, in host memory) on the GPU with the decode check the
    runtime uses."""
    device = torch.device("cuda", torch.cuda.current_device())
    decoder = get_codec(entry.codec).gpu_decoder(entry.chunks, entry.params, entry.layout, device)
    src = payload.to(device)
    out = torch.empty(entry.decoded_size, dtype=torch.uint8, device=device)
    pending = decoder.decode(src, out, torch.cuda.current_stream(device), check=True)
    try:
        if pending is not None:
            pending.result()
    except OffloadError as exc:
        raise locate_error(exc, reader.path, entry.name) from exc
