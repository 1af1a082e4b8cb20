"""Device scratch shared by the GPU decoders of one runtime: one buffer per kind, reused by every group.

Why shared: a decoder's scratch (nvCOMP's temp workspace, int8's buffer of stored bytes) is only live
during one decode, and the runtime issues the decodes of streamed groups one after another on a single
decode stream. A buffer per group would make the budget pay for every streamed group's scratch (for
nvCOMP Zstd, more than keeping the weights resident); a buffer per kind, as large as the largest need
among the decoders bound to it, is paid once.

What makes sharing safe is stream order: two decodes enqueued on the same stream run one after the other,
so the second cannot overwrite scratch the first still reads. A :class:`DecodeWorkspace` therefore
remembers, per kind, the stream of its latest decode and an event recorded after it; a decode on another
stream first makes that stream wait on the event (a device-side wait, no host synchronisation). Decodes
sharing a workspace must be issued from one host thread at a time (the runtime's prefetch worker).

Where the bytes come from: an ``allocate`` function (``nbytes -> uint8 tensor``). A runtime passes pieces of
its arena and sizes them in its plan, so a workspace made that way is *fixed*: a reservation beyond what was
allocated is an error, never a silent new allocation outside the budget. Without ``allocate`` (a decoder
used on its own) buffers come from torch and grow on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from offload_runtime.errors import PlanError

Allocate = Callable[[int], torch.Tensor]  # nbytes -> uint8 tensor of at least nbytes on the device


def device_allocator(device: torch.device | str) -> Allocate:
    """Plain torch allocations of uint8 tensors on ``device``."""
    device = torch.device(device)

    def allocate(nbytes: int) -> torch.Tensor:
        return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)

    return allocate


class DecodeWorkspace:
    """Device buffers, one per scratch kind, shared by every decoder bound to this workspace.

    Args:
        device (`torch.device`): the CUDA device of the buffers.
        allocate (`Allocate`, *optional*): where buffers come from; when given the workspace is fixed once
            :meth:`allocate` ran (a runtime's arena: the plan sized it), else buffers come from torch and
            grow if a later reservation exceeds them.

    Sizes are *reserved* by decoders (:meth:`reserve`, the largest request of each kind wins); buffers
    are allocated by :meth:`allocate` (the runtime, at build time, on its decode stream) or else on the
    first :meth:`acquire` of a kind.
    """

    def __init__(self, device: torch.device | str, allocate: Allocate | None = None) -> None:
        self.device = torch.device(device)
        self._allocate = allocate
        self._needed: dict[str, int] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._streams: dict[str, torch.cuda.Stream] = {}
        self._done: dict[str, torch.cuda.Event] = {}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in sorted(self._needed.items()))
        return f"DecodeWorkspace({self.device}, {sizes or 'empty'})"

    @property
    def sizes(self) -> dict[str, int]:
        """Reserved bytes per kind."""
        return dict(self._needed)

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers once allocated (sum over kinds of the largest reservation)."""
        return sum(self._needed.values())

    def reserve(self, needs: Mapping[str, int]) -> None:
        """Make each kind's buffer at least ``needs[kind]`` bytes.

        Raises:
            PlanError: the workspace is fixed (made from a runtime's arena) and a need exceeds its buffer.
        """
        for kind, nbytes in needs.items():
            held = self._buffers.get(kind)
            if self._allocate is not None and held is not None and held.numel() < nbytes:
                raise PlanError(
                    f"decode workspace {kind!r} was sized by the plan and is too small for this decoder",
                    expected=f">= {int(nbytes)} bytes",
                    actual=f"{held.numel()} bytes",
                )
            self._needed[kind] = max(self._needed.get(kind, 0), int(nbytes))

    def allocate(self, stream: torch.cuda.Stream) -> None:
        """Allocate every reserved buffer now, on ``stream`` (the stream decodes will run on)."""
        for kind in self._needed:
            self._buffer(kind, stream)

    def acquire(self, kind: str, stream: torch.cuda.Stream) -> torch.Tensor:
        """The ``kind`` buffer (uint8, >= its reservation), ordered after its previous use on any stream.

        Call :meth:`release` with the same stream once the decode using it is enqueued.
        """
        previous = self._streams.get(kind)
        buffer = self._buffer(kind, stream)
        if previous is not None and previous != stream:
            # the previous decode on another stream may still read it: order after it, on the device
            stream.wait_event(self._done[kind])
            if self._allocate is None:
                buffer.record_stream(stream)
        return buffer

    def release(self, kind: str, stream: torch.cuda.Stream) -> None:
        """Mark the end of the decode just enqueued on ``stream`` that used the ``kind`` buffer."""
        event = self._done.get(kind)
        if event is None:
            event = self._done[kind] = torch.cuda.Event()
        event.record(stream)
        self._streams[kind] = stream

    def _buffer(self, kind: str, stream: torch.cuda.Stream) -> torch.Tensor:
        needed = self._needed.get(kind, 0)
        if self._allocate is None:
            needed = max(needed, 1)  # a real (non-null) pointer for a library that needs no scratch
        buffer = self._buffers.get(kind)
        if buffer is None or buffer.numel() < needed:
            if self._allocate is not None:  # a kind that needs nothing takes an empty piece: no bytes
                if buffer is not None:  # unreachable through reserve(); kept as the invariant's guard
                    raise PlanError(f"decode workspace {kind!r} cannot grow: it was sized by the plan")
                buffer = self._allocate(needed)
            else:
                # allocated on the decode stream, so freeing a grown-out buffer is ordered after its decodes
                with torch.cuda.device(self.device), torch.cuda.stream(stream):
                    buffer = torch.empty(needed, dtype=torch.uint8, device=self.device)
            self._buffers[kind] = buffer
        return buffer
