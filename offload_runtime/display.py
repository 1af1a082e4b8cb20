"""What a person reads: byte sizes in one unit family, and progress bars that agree with them.

Every size offload_runtime prints is in MiB or GiB (powers of 1024, like the plan), and its progress bars
count MiB, so a bar's total matches the sizes printed beside it (tqdm's own ``unit_scale`` would show
decimal MB). Importing this module imports neither torch nor tqdm.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

MIB, GIB = 1 << 20, 1 << 30


def format_bytes(n: float) -> str:
    """``n`` bytes in MiB, or GiB from 1 GiB up: ``0.55 MiB``, ``337.6 MiB``, ``1.25 GiB``."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.2f} MiB" if n < 10 * MIB else f"{n / MIB:.1f} MiB"


def mib(n: float) -> str:
    """``n`` bytes in MiB to two decimals, whatever the size (table columns: plans, ``inspect``)."""
    return f"{n / MIB:.2f} MiB"


class ByteBar:
    """A tqdm progress bar counting bytes, shown in MiB.

    Args:
        total (`int`, *optional*): bytes expected; ``None`` when unknown (a counter, no bar).
        desc (`str`): what is being done.
        enabled (`bool`, defaults to `True`): ``False`` shows nothing.
        stream (`TextIO`, defaults to stderr): where it is drawn.
    """

    def __init__(self, total: int | None, desc: str, *, enabled: bool = True, stream: TextIO | None = None):
        self._bar = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        if total is None:
            fmt = "{desc}: {n:.1f} MiB [{elapsed}, {rate_fmt}{postfix}]"
        else:
            fmt = (
                "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MiB "
                "[{elapsed}<{remaining}, {rate_fmt}{postfix}]"
            )
        self._bar = tqdm(
            total=None if total is None else total / MIB,
            desc=desc,
            unit="MiB",
            bar_format=fmt,
            file=stream or sys.stderr,
            leave=True,
        )

    def update(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes / MIB)

    def set_postfix(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadProgress:
    """A container reader that also counts, on a :class:`ByteBar`, the payload bytes it hands out.

    While a model loads (resident groups decoded, host-tier payloads copied into RAM) the runtime reads
    through this proxy and the bar moves; :meth:`finish` closes the bar, after which every call is
    forwarded unchanged (the runtime keeps the proxy as its source while the model streams).

    Args:
        reader: a :class:`~offload_runtime.loaders.ContainerReader`.
        desc (`str`): the bar's label.
    """

    _COUNTED = frozenset({"read_into", "decode_cpu", "payload"})

    def __init__(self, reader: Any, desc: str) -> None:
        self._reader = reader
        self._desc = desc
        self._counting = True
        self._bar: ByteBar | None = None  # drawn at the first read: a load refused before reading shows none

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._reader, name)
        if not self._counting or name not in self._COUNTED:
            return value

        def counted(group: str, *args: Any, **kwargs: Any) -> Any:
            result = value(group, *args, **kwargs)
            if self._counting:
                if self._bar is None:
                    self._bar = ByteBar(None, self._desc)
                self._bar.update(self._reader.group(group).stored_size)
            return result

        return counted

    def finish(self) -> None:
        """Close the bar; from now on calls go straight to the reader."""
        self._counting = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
