"""A group source whose payloads are regenerated on demand instead of stored: models larger than RAM or disk.

:class:`SyntheticSource` is a :class:`~offload_runtime.loaders.source.GroupSource` like a
:class:`~offload_runtime.loaders.ContainerReader` but holds no payload bytes. A caller-given
``fill(index, buffer)`` writes group ``index``'s decoded bytes (its layout) into a buffer on the encoding
device, deterministically. Two phases:

1. construction: every group is generated, encoded, and only its chunk table, params and stored size are
   kept (a :class:`~offload_runtime.loaders.format.GroupEntry`); the bytes are dropped;
2. ``read_into`` (the runtime placing a group in its tier): the group is generated and encoded again and
   its payload copied out; every chunk's CRC-32 is compared with phase 1, so a non-deterministic encoder
   is a :class:`CorruptCheckpointError` naming the group and chunk, never wrong weights.

So a group exists only transiently, one at a time, besides the tier storage the plan gives it. On CUDA the
group is generated and packed on the GPU, and codecs that encode on the device (``ans``, ``int8``:
``GroupCodec.encodes_on_device``) encode it there; only the payload and, for the chunk CRCs, the decoded
bytes (phase 1) cross PCIe, through one reusable pinned buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from offload_runtime.errors import CodecUnavailableError, CorruptCheckpointError, OffloadError
from offload_runtime.loaders.format import GroupEntry, tensor_name
from offload_runtime.loaders.groups import GroupSpec
from offload_runtime.loaders.reader import locate_error
from offload_runtime.loaders.verify import VerifyPolicy
from offload_runtime.native import GroupCodec, GroupLayout, get_codec, resolve_codec
from offload_runtime.native.base import EncodedTensor, HostBuffer
from offload_runtime.native.chunking import crc32_spans

Fill = Callable[[int, torch.Tensor], None]


class SyntheticSource:
    """Groups that are generated on demand (see the module docstring).

    Args:
        specs (`Sequence[GroupSpec]`): the groups, in execution order.
        layouts (`Sequence[GroupLayout]`): the decoded layout of each group.
        fill (`Callable[[int, torch.Tensor], None]`): writes group ``i``'s decoded bytes into a uint8
            buffer of ``layouts[i].size`` bytes (zeroed) on ``device``; must be deterministic.
        codec (`str`, defaults to `"auto"`): codec name, resolved per group for ``device``.
        device (`torch.device` or `str`, defaults to `"cpu"`): where groups are generated and encoded.

    Attributes:
        groups: the :class:`GroupEntry` of every group (chunk tables with CRCs, no payload).
        peak_group_bytes: the most decoded-group bytes this source ever held at once (one group's size).
        generated: how many times each group was generated (phase 1 counts once).
    """

    path = None

    def __init__(
        self,
        specs: Sequence[GroupSpec],
        layouts: Sequence[GroupLayout],
        fill: Fill,
        *,
        codec: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        if len(specs) != len(layouts):
            raise ValueError(f"{len(specs)} group specs but {len(layouts)} layouts")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.policy = VerifyPolicy("once")  # payloads are compared with phase 1's CRCs on every read
        self._fill = fill
        self._layouts = list(layouts)
        self._index = {spec.name: i for i, spec in enumerate(specs)}
        self._codecs: list[GroupCodec] = [resolve_codec(codec, layout, self.device) for layout in layouts]
        self._host = HostBuffer(pinned=self.device.type == "cuda")  # reused for the encoders' D2H copies
        self._live_bytes = 0
        self.peak_group_bytes = 0
        self.generated: dict[str, int] = {}
        self.groups: list[GroupEntry] = []
        for i, spec in enumerate(specs):
            encoded = self._encode(i, spec.name, checksums=True)
            self.groups.append(
                GroupEntry(
                    name=spec.name,
                    kind=spec.kind,
                    users=list(spec.users),
                    aliases=dict(spec.aliases),
                    tensor=tensor_name(i),
                    codec=self._codecs[i].name,
                    params=encoded.params,
                    layout=self._layouts[i],
                    stored_layout=encoded.stored_layout,
                    stored_size=encoded.stored_size,
                    chunks=encoded.chunks,
                    expert=spec.expert,
                )
            )
        self._by_name = {g.name: g for g in self.groups}

    def __repr__(self) -> str:
        stored = sum(g.stored_size for g in self.groups)
        decoded = sum(g.decoded_size for g in self.groups)
        return f"SyntheticSource({len(self.groups)} groups, decoded {decoded} B, stored {stored} B)"

    # -- the reader interface --------------------------------------------------------------------------

    def group(self, name: str) -> GroupEntry:
        """The entry of group ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no group {name!r} in the synthetic model") from None

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Regenerate and re-encode group ``name``, copy its payload into ``out`` (1-D uint8 CPU tensor).

        Returns:
            `torch.Tensor`: ``out[:stored_size]``.

        Raises:
            CorruptCheckpointError: a chunk differs from the first encoding (a non-deterministic encoder or
                generator), naming the group and chunk.
        """
        entry = self.group(name)
        if out.dtype != torch.uint8 or out.dim() != 1 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"need a contiguous 1-D uint8 CPU tensor, got {out.dtype} {tuple(out.shape)}")
        if out.numel() < entry.stored_size:
            raise ValueError(f"group {name!r} needs {entry.stored_size} bytes, buffer has {out.numel()}")
        # no checksums of its own: the bytes copied into ``dest`` are compared with phase 1's CRCs below
        encoded = self._encode(self._index[name], name, checksums=False)
        dest = out[: entry.stored_size]
        if encoded.stored_size == entry.stored_size:
            encoded.write(dest)
        self._check_same(entry, encoded, dest)
        return dest

    def decode_cpu(self, name: str, out: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Regenerate group ``name`` and decode its payload on the CPU into ``out``.

        Args:
            name (`str`): the group.
            out (`torch.Tensor`): destination, uint8 CPU, at least ``layout.size`` bytes.
            staging (`torch.Tensor`, *optional*): reusable buffer of >= ``stored_size`` bytes for the payload.

        Raises:
            CodecUnavailableError: the codec has no CPU decoder (``ans``, ``int8`` over ``ans``); checked
                before anything is generated, so the runtime's GPU fallback costs nothing here.
        """
        entry = self.group(name)
        if not get_codec(entry.codec).decodes_on_cpu(entry.params):
            raise CodecUnavailableError(
                f"this group is stored with codec {entry.codec!r}, which has no CPU decoder",
                codec=entry.codec,
                missing="a CPU decoder for it",
                alternative="zstd",
                group=name,
            )
        if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < entry.layout.size:
            raise ValueError(
                f"group {name!r} decodes to {entry.layout.size} uint8 bytes; got {tuple(out.shape)}"
            )
        if staging is None or staging.numel() < entry.stored_size:
            staging = torch.empty(entry.stored_size, dtype=torch.uint8)
        payload = self.read_into(name, staging)
        try:
            get_codec(entry.codec).decode_cpu(
                memoryview(payload.numpy()),
                entry.chunks,
                entry.params,
                entry.layout,
                out,
                verify_decoded=True,
            )
        except OffloadError as exc:
            raise locate_error(exc, None, name) from exc
        return out[: entry.layout.size]

    def trim(self) -> None:
        """Free the reusable host buffer (after dispatch; a later read allocates it again)."""
        self._host.release()

    def close(self) -> None:
        """Release the host buffer; present for the reader interface."""
        self.trim()

    # -- internals -------------------------------------------------------------------------------------

    def _generate(self, index: int, name: str) -> torch.Tensor:
        layout = self._layouts[index]
        buffer = torch.zeros(layout.size, dtype=torch.uint8, device=self.device)
        self._fill(index, buffer)
        self.generated[name] = self.generated.get(name, 0) + 1
        return buffer

    def _encode(self, index: int, name: str, *, checksums: bool) -> EncodedTensor:
        """Generate group ``index`` and encode it; the decoded buffer is freed before returning."""
        layout = self._layouts[index]
        self._live_bytes += layout.size
        self.peak_group_bytes = max(self.peak_group_bytes, self._live_bytes)
        try:
            # handed over in a list the encoders pop from: no caller frame keeps the buffer alive, so it is
            # freed as soon as an encoder is done with it (GPU memory is tight next to a full budget)
            held = [self._generate(index, name)]
            return self._codecs[index].encode_tensor(layout, held, checksums, host_buffer=self._host)
        finally:
            self._live_bytes -= layout.size

    def _check_same(self, entry: GroupEntry, encoded: EncodedTensor, payload: torch.Tensor) -> None:
        """Compare the second encoding (and the bytes copied out) with the first, chunk by chunk."""
        hint = "the generator or encoder is not deterministic on this device; use codec='raw' or 'zstd'"
        if encoded.stored_size != entry.stored_size or len(encoded.chunks) != len(entry.chunks):
            raise CorruptCheckpointError(
                "synthetic group re-encoded to a different size",
                group=entry.name,
                expected=f"{entry.stored_size} bytes in {len(entry.chunks)} chunks",
                actual=f"{encoded.stored_size} bytes in {len(encoded.chunks)} chunks",
                hint=hint,
            )
        spans = [(c.offset, c.size) for c in entry.chunks]
        actual = crc32_spans(payload.numpy(), spans)
        for i, (first, again, crc) in enumerate(zip(entry.chunks, encoded.chunks, actual, strict=True)):
            if (first.offset, first.size) != (again.offset, again.size) or crc != first.crc32:
                raise CorruptCheckpointError(
                    "synthetic group re-encoded to different bytes (chunk CRC-32 mismatch)",
                    group=entry.name,
                    chunk=i,
                    expected=f"{first.crc32:#010x} ({first.size} bytes at {first.offset})",
                    actual=f"{crc:#010x} ({again.size} bytes at {again.offset})",
                    hint=hint,
                )
