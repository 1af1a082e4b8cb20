"""Read a container: validate everything on open, then hand out payloads with checksum verification.

Payload bytes come from a read-only ``mmap`` (zero copy) or from ``os.preadv`` straight into a caller's
(pinned) buffer. A file truncated under a live mmap kills the process with SIGBUS, so before every read the
file's identity (inode, size, mtime) is compared with what was validated on open, and a change raises
:class:`CorruptCheckpointError` instead. ``read_into`` uses ``preadv``, which cannot SIGBUS at all (a
short read is reported as truncation), and so does ``decode_cpu`` (into a caller's reusable staging
buffer, so the steady state allocates nothing); views returned by ``payload`` are only guarded when
created, which is why the runtime never decodes from them. A file whose name marks it as a writer's
temporary (``.<name>.<pid>.tmp``) is refused.

A mixture of experts' container stores each routed expert as a group of its own. The reader presents the
groups at one of two granularities: ``"block"`` (the default, what the block runtime streams): a block
and its experts are one *reassembled* group whose stacked parameters are whole again (``reassemble.py``);
``"expert"``: the groups as stored (block groups without their experts, and one group per expert, with
their ``expert`` records), for a runtime that streams experts on their own. Dense containers look the same
at both.

A container with tensor-parallel slices (``tp_slices.py``) is presented with every tensor whole, or, after
:meth:`ContainerReader.shard`, with this rank's local tensors: then only the rank's slices (and the groups'
unsliced tensors) are ever read. ``bytes_read`` and ``stored_read`` count what was read from the file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from types import TracebackType

import torch

from offload_runtime.errors import (
    CheckpointError,
    CodecUnavailableError,
    CorruptCheckpointError,
    OffloadError,
)
from offload_runtime.loaders import reassemble
from offload_runtime.loaders.format import ContainerIndex, GroupEntry
from offload_runtime.loaders.source import GroupSource
from offload_runtime.loaders.validate import read_container_header
from offload_runtime.loaders.verify import DECODED, PAYLOAD, VERIFY_POLICIES, VerifyPolicy
from offload_runtime.loaders.writer import is_temporary_name, temporary_target
from offload_runtime.native import get_codec
from offload_runtime.native.availability import NVCOMP_EXTRA_HINT, gpu_codecs_unavailable_reason
from offload_runtime.native.chunking import check_decoded_crcs, crc32
from offload_runtime.validate_args import one_of

__all__ = ["GRANULARITIES", "VERIFY_POLICIES", "ContainerReader", "locate_error"]

GRANULARITIES = ("block", "expert")


class ContainerReader:
    """An open container.

    Args:
        path (`str` or `os.PathLike`): the container file.
        verify (`str`, defaults to `"once"`): when to check chunk CRC-32s: ``"once"`` the first time each
            group is read, ``"always"`` on every read, ``"never"`` to skip (trusted local files). The
            :class:`~offload_runtime.loaders.verify.VerifyPolicy` (``policy``) is shared with the loaders
            that decode from this reader.
        granularity (`str`, defaults to `"block"`): ``"block"``: a block and its expert groups are one
            (reassembled) group; ``"expert"``: the groups as stored (see the module docstring).

    Raises:
        UsageError: an unknown ``granularity``, before the file is opened.
        CorruptCheckpointError, CheckpointError, CodecUnavailableError: from the validation of the header
            and index, which runs entirely on open.
    """

    def __init__(self, path: str | os.PathLike, *, verify: str = "once", granularity: str = "block") -> None:
        self.policy = VerifyPolicy(verify)
        self.granularity = one_of(granularity, "granularity", GRANULARITIES)
        self.path = Path(path)
        self.verify = verify
        if is_temporary_name(self.path):
            raise CheckpointError(
                "this is a temporary file of an unfinished or interrupted pack, not a container",
                file=self.path,
                hint=f"delete it and pack again; the container is written to {temporary_target(self.path)}",
            )
        self._file = open(self.path, "rb")  # noqa: SIM115  (closed in close())
        try:
            parsed = read_container_header(self._file, self.path)
            self._identity = _identity(os.fstat(self._file.fileno()))
            size = self._identity[2]
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise
        self.index: ContainerIndex = parsed.index
        self._offsets = parsed.offsets
        self._stored = {g.name: g for g in self.index.groups}
        self.shards = None
        self._groups, self._parts = reassemble.view(self.index.groups, granularity)
        self._by_name = {g.name: g for g in self._groups}
        self.bytes_read = 0  # payload bytes read from the file (each read counted)
        self.stored_read: set[str] = set()  # stored groups whose payload was read at least once
        self._closed = False

    def shard(self, shards) -> None:
        """Present this rank's local tensors of a tensor-parallel run from now on (before any read).

        Args:
            shards (`RankShards`): the rank, the number of ranks and the model's placements
                (``tp_slices.RankShards``). Groups with tensor-parallel slices are then read from this
                rank's slices only; a tensor stored whole is read whole and this rank's part of it kept.

        Raises:
            CheckpointMismatchError: a tensor is sliced along another dimension than the model shards it,
                or the number of ranks does not divide the number of slices.
        """
        self.shards = shards
        self._present()

    def set_granularity(self, granularity: str) -> None:
        """Present the groups at ``granularity`` from now on (before any read): what opening the file
        again with that granularity gives, without reading and validating its index a second time.

        Raises:
            UsageError: an unknown ``granularity``.
        """
        self.granularity = one_of(granularity, "granularity", GRANULARITIES)
        self._present()

    def _present(self) -> None:
        """The groups as this reader presents them: at its granularity, sharded when it is."""
        self._groups, self._parts = reassemble.view(self.index.groups, self.granularity, self.shards)
        self._by_name = {g.name: g for g in self._groups}

    @property
    def groups(self) -> list[GroupEntry]:
        """Every group at the reader's granularity, in stored (execution) order."""
        return self._groups

    def group(self, name: str) -> GroupEntry:
        """The entry of group ``name`` at the reader's granularity."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no group {name!r} in {self.path}") from None

    def payload(self, name: str) -> memoryview:
        """Read-only view of group ``name``'s payload (``stored_size`` bytes), CRC-checked.

        Zero-copy for a stored group; a reassembled group's parts are copied into a new buffer.
        """
        entry = self.group(name)
        parts = self._parts.get(name)
        if parts is not None:
            out = torch.zeros(entry.stored_size, dtype=torch.uint8)
            return memoryview(reassemble.read_parts_into(parts, self._read_stored, out).numpy()).toreadonly()
        view = self._view(entry)
        if self.policy.due(PAYLOAD, name):
            self._check_chunks(entry, view)
            self.policy.passed(PAYLOAD, name)
        return view

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy group ``name``'s payload into ``out`` (1-D uint8 CPU tensor of >= ``stored_size`` bytes).

        Args:
            name (`str`): the group.
            out (`torch.Tensor`): destination, e.g. a pinned staging buffer.

        Returns:
            `torch.Tensor`: ``out[:stored_size]``.
        """
        entry = self.group(name)
        parts = self._parts.get(name)
        if parts is not None:
            self._check_buffer(entry, out)
            return reassemble.read_parts_into(parts, self._read_stored, out)
        return self._read_stored(name, out)

    def _check_buffer(self, entry: GroupEntry, out: torch.Tensor) -> None:
        if out.dtype != torch.uint8 or out.dim() != 1 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"need a contiguous 1-D uint8 CPU tensor, got {out.dtype} {tuple(out.shape)}")
        if out.numel() < entry.stored_size:
            raise ValueError(
                f"group {entry.name!r} needs {entry.stored_size} bytes, buffer has {out.numel()}"
            )

    def _read_stored(self, name: str, out: torch.Tensor) -> torch.Tensor:
        entry = self._stored[name]
        self._check_buffer(entry, out)
        self._check_unchanged(entry)
        dest = out[: entry.stored_size]
        buffer = memoryview(dest.numpy())
        start, done = self._offsets[name], 0
        self._count(entry)
        while done < entry.stored_size:
            n = os.preadv(self._file.fileno(), [buffer[done:]], start + done)
            if n <= 0:
                raise CorruptCheckpointError(
                    "file ended inside a group payload (truncated after open?)",
                    file=self.path,
                    group=name,
                    expected=entry.stored_size,
                    actual=done,
                )
            done += n
        if self.policy.due(PAYLOAD, name):
            self._check_chunks(entry, buffer)
            self.policy.passed(PAYLOAD, name)
        return dest

    def decode_cpu(self, name: str, out: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Decode group ``name`` on the CPU into ``out`` (uint8 CPU tensor of ``layout.size`` bytes).

        The payload is read with ``preadv`` (never from the mmap, so truncation cannot SIGBUS); the
        compressed CRCs are checked before the decoder sees it and the decoded CRCs after: of the output
        for groups that decode to their layout (every lossless codec), of the stored bytes before the
        transform back for the others (``int8``). Both follow the reader's ``verify`` policy.

        Args:
            name (`str`): the group.
            out (`torch.Tensor`): destination, uint8, at least ``layout.size`` bytes.
            staging (`torch.Tensor`, *optional*): a caller-owned contiguous 1-D uint8 CPU buffer of at least
                ``stored_size`` bytes that the payload is read into; reusing one across calls keeps the
                decode path free of allocations (``None`` allocates one per call).

        Raises:
            CorruptCheckpointError: a checksum mismatch, a chunk that does not decode, a file changed after
                open, naming file, group and chunk.
            CodecUnavailableError: the codec has no CPU decoder (``ans``), naming the extra to install.
        """
        entry = self.group(name)
        parts = self._parts.get(name)
        if parts is None:
            return self._decode_stored(name, out, staging)
        if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < entry.layout.size:
            raise ValueError(
                f"group {name!r} decodes to {entry.layout.size} uint8 bytes; got {tuple(out.shape)}"
            )
        return reassemble.decode_parts_cpu(parts, self._decode_stored, out[: entry.layout.size], staging)

    def _decode_stored(
        self, name: str, out: torch.Tensor, staging: torch.Tensor | None = None
    ) -> torch.Tensor:
        entry = self._stored[name]
        if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < entry.layout.size:
            raise ValueError(
                f"group {name!r} decodes to {entry.layout.size} uint8 bytes; got {tuple(out.shape)}"
            )
        if staging is None:
            staging = torch.empty(entry.stored_size, dtype=torch.uint8)
        # pread into a private buffer rather than decode from the mmap: a file truncated between the
        # identity check and the decoder's reads would SIGBUS the process; a short pread is a typed error
        # a group of this view is read through the public read_into (one read path); a part of a
        # reassembled group through the stored read
        read = self.read_into if self._by_name.get(name) is entry else self._read_stored
        payload = memoryview(read(name, staging).numpy())
        check_decoded = self.policy.due(DECODED, name)
        lossy = entry.stored_layout is not None
        try:
            codec = get_codec(entry.codec)
            if lossy:  # the codec checks what its chunks decode to before transforming it
                codec.decode_cpu(
                    payload, entry.chunks, entry.params, entry.layout, out, verify_decoded=check_decoded
                )
            else:
                codec.decode_cpu(payload, entry.chunks, entry.params, entry.layout, out)
        except OffloadError as exc:  # codecs know the chunk, not the file or group: add them
            raise locate_error(exc, self.path, name) from exc
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as exc:
            # the index is untrusted input: a codec tripping over forged params/sizes is a corrupt file
            raise CorruptCheckpointError(
                f"group does not decode ({type(exc).__name__}: {exc})",
                file=self.path,
                group=name,
                hint="the container is damaged or forged; re-pack it",
            ) from exc
        if check_decoded and not lossy:
            try:
                check_decoded_crcs(out[: entry.layout.size].numpy(), entry.chunks)
            except OffloadError as exc:
                raise locate_error(exc, self.path, name) from exc
        if check_decoded:
            self.policy.passed(DECODED, name)
        return out[: entry.layout.size]

    def close(self) -> None:
        """Release the file and the mapping (the mapping lives on while a ``payload`` view is alive)."""
        if self._closed:
            return
        self._closed = True
        if self._mmap is not None:
            # views handed out by payload() keep it mapped; it is unmapped when the last one dies
            with contextlib.suppress(BufferError):
                self._mmap.close()
        self._file.close()

    def __enter__(self) -> ContainerReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ContainerReader({str(self.path)!r}, groups={len(self.groups)}, verify={self.verify!r}, "
            f"granularity={self.granularity!r})"
        )

    # -- internals -----------------------------------------------------------------------------------

    def _view(self, entry: GroupEntry) -> memoryview:
        self._check_unchanged(entry)
        start = self._offsets[entry.name]
        if self._mmap is None or entry.stored_size == 0:
            return memoryview(b"")
        self._count(entry)
        return memoryview(self._mmap)[start : start + entry.stored_size]

    def _count(self, entry: GroupEntry) -> None:
        self.bytes_read += entry.stored_size
        self.stored_read.add(entry.name)

    def _check_unchanged(self, entry: GroupEntry) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        try:
            now = (_identity(os.stat(self.path)), _identity(os.fstat(self._file.fileno())))
        except FileNotFoundError:
            now = None
        if now is None or now[0] != self._identity or now[1] != self._identity:
            raise CorruptCheckpointError(
                "container was replaced, truncated or modified after it was opened",
                file=self.path,
                group=entry.name,
                expected=self._identity,
                actual=now and now[0],
                hint="do not rewrite a container while it is in use; reopen it",
            )

    def _check_chunks(self, entry: GroupEntry, payload: memoryview) -> None:
        for i, chunk in enumerate(entry.chunks):
            actual = crc32(payload[chunk.offset : chunk.offset + chunk.size])
            if actual != chunk.crc32:
                raise CorruptCheckpointError(
                    "chunk CRC-32 mismatch",
                    file=self.path,
                    group=entry.name,
                    chunk=i,
                    expected=f"{chunk.crc32:#010x}",
                    actual=f"{actual:#010x}",
                    hint="the container is damaged; re-pack it",
                )


def locate_error(exc: OffloadError, path: Path | None, group: str) -> OffloadError:
    """A copy of ``exc`` (same type and fields) that also names the file and group, and for a codec
    that cannot run without nvCOMP, the extra to install."""
    _, (cls, summary, state, extra) = exc.__reduce__()
    state["file"] = state["file"] or (os.fspath(path) if path is not None else None)
    state["group"] = state["group"] or group
    if isinstance(exc, CodecUnavailableError) and not state["hint"] and gpu_codecs_unavailable_reason():
        state["hint"] = f"to decode it on a GPU, {NVCOMP_EXTRA_HINT}"
    return cls(summary, **state, **extra)


def decode_held_payload(
    source: GroupSource, entry: GroupEntry, payload: torch.Tensor, out: torch.Tensor
) -> None:
    """Decode ``entry`` on the CPU from ``payload``, its copy already in host memory (read through
    ``source``, which checked the compressed CRCs then), into ``out``; the decoded CRCs are checked per the
    source's policy, and an error names the file and group."""
    policy = source.policy
    check = policy.due(DECODED, entry.name)
    try:
        get_codec(entry.codec).decode_cpu(
            memoryview(payload.numpy()), entry.chunks, entry.params, entry.layout, out, verify_decoded=check
        )
    except OffloadError as exc:  # the codec knows the chunk: add the file and group
        raise locate_error(exc, source.path, entry.name) from exc
    if check:
        policy.passed(DECODED, entry.name)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
