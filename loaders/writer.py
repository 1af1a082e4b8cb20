"""Write a container group by group, atomically.

The safetensors header (which holds the index) must precede the data, but the index is only known once
every group is encoded. Rather than guess how much header space to reserve, payloads are streamed as they
come to a temporary *data* file next to the output; :meth:`ContainerWriter.close` then writes the header
to a temporary *container* file, appends the data with ``os.copy_file_range`` (a reflink or an in-kernel
copy on most filesystems, so no user-space buffer), fsyncs, renames it over ``path`` and fsyncs the
directory. Only one encoded group is ever held in memory, by the caller.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from types import TracebackType

import numpy as np

from offload_runtime.loaders.format import (
    FORMAT_VERSION,
    ContainerIndex,
    GroupEntry,
    encode_header,
    index_format_version,
    tensor_name,
)
from offload_runtime.loaders.groups import GroupSpec
from offload_runtime.loaders.validate import parse_index
from offload_runtime.native.base import EncodedGroup
from offload_runtime.native.layout import GroupLayout

_COPY_STEP = 1 << 30
# ``.<name>.<pid>.tmp`` (header + data, renamed to <name> when complete) and ``.<name>.<pid>.data.tmp``
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)(\.data)?\.tmp$")


class ContainerWriter:
    """Streams encoded groups into a new container at ``path``; the file appears only on a clean close.

    Args:
        path (`str` or `os.PathLike`): the container to create (replaced atomically if it exists).
        model_class (`str`, *optional*): transformers class name of the model.
        config (`dict`, *optional*): HF ``config.to_dict()``.
        generation_config (`dict`, *optional*): HF generation config as a dict.
        tokenizer (`dict[str, str]`, *optional*): tokenizer file name -> text.
        dtype (`str`, *optional*): stored floating dtype name.

    Example::

        with ContainerWriter("model.ort") as writer:
            writer.add_group(spec, layout, codec.encode(layout, data), codec.name)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model_class: str | None = None,
        config: dict | None = None,
        generation_config: dict | None = None,
        tokenizer: dict[str, str] | None = None,
        dtype: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.index = ContainerIndex(FORMAT_VERSION, [], None, None, None, None, None)
        self.set_model_info(
            model_class=model_class,
            config=config,
            generation_config=generation_config,
            tokenizer=tokenizer,
            dtype=dtype,
        )
        remove_stale_temporaries(self.path)
        self._data_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.data.tmp")
        self._tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._data = open(self._data_path, "wb")  # noqa: SIM115  (closed in close/abort)
        self._done = False

    def set_model_info(
        self,
        *,
        model_class: str | None = None,
        config: dict | None = None,
        generation_config: dict | None = None,
        tokenizer: dict[str, str] | None = None,
        dtype: str | None = None,
    ) -> None:
        """Set the model metadata stored in the index (any time before :meth:`close`)."""
        self.index.model_class = model_class
        self.index.config = config
        self.index.generation_config = generation_config
        self.index.tokenizer = tokenizer
        self.index.dtype = dtype

    def add_group(
        self, spec: GroupSpec, layout: GroupLayout, encoded: EncodedGroup, codec_name: str
    ) -> GroupEntry:
        """Append one encoded group; its payload goes to disk now.

        Args:
            spec (`GroupSpec`): the group (name, kind, users, aliases).
            layout (`GroupLayout`): what the group decodes to.
            encoded (`EncodedGroup`): the codec's output for this group.
            codec_name (`str`): the codec that made ``encoded``.

        Returns:
            `GroupEntry`: the index entry written for it.
        """
        if self._done:
            raise ValueError(f"ContainerWriter for {self.path} is closed")
        payload = np.ascontiguousarray(encoded.payload).view(np.uint8).reshape(-1)
        entry = GroupEntry(
            name=spec.name,
            kind=spec.kind,
            users=list(spec.users),
            aliases=dict(spec.aliases),
            tensor=tensor_name(len(self.index.groups)),
            codec=codec_name,
            params=dict(encoded.params),
            layout=layout,
            stored_layout=encoded.stored_layout,
            stored_size=int(payload.size),
            chunks=list(encoded.chunks),
            expert=getattr(spec, "expert", None),
        )
        self._data.write(memoryview(payload))
        self._data.write(bytes(entry.padded_size - entry.stored_size))
        self.index.groups.append(entry)
        return entry

    def close(self) -> Path:
        """Write the header, append the payloads and publish the file atomically; returns ``path``."""
        if self._done:
            return self.path
        try:
            self.index.format_version = index_format_version(self.index.groups)
            # round-trip the index through the reader's validator: never publish a container we cannot read
            parse_index(self.index.to_json(), self.path)
            self._data.flush()
            data_size = self._data.tell()
            self._data.close()
            with open(self._tmp_path, "wb") as out, open(self._data_path, "rb") as data:
                out.write(encode_header(self.index))
                out.flush()
                _copy(data.fileno(), out.fileno(), data_size)
                out.flush()
                os.fsync(out.fileno())
            os.replace(self._tmp_path, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        _unlink(self._data_path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; ``path`` is left untouched."""
        self._done = True
        self._data.close()
        _unlink(self._data_path)
        _unlink(self._tmp_path)

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # a writer dropped without close leaves no temp files behind
        if not getattr(self, "_done", True):
            self.abort()


def is_temporary_name(path: str | os.PathLike) -> bool:
    """True when ``path`` is named like a :class:`ContainerWriter` temporary: ``.<name>.<pid>[.data].tmp``."""
    return _TEMPORARY.match(Path(path).name) is not None


def temporary_target(path: str | os.PathLike) -> Path:
    """The container a temporary named by :func:`is_temporary_name` was being written to."""
    path = Path(path)
    match = _TEMPORARY.match(path.name)
    return path.with_name(match["target"]) if match else path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries of ``path`` left by writers that no longer run (a pack killed by SIGKILL or
    a power cut cannot clean up); those of live processes, possibly packing right now, are kept.

    Returns:
        `list[pathlib.Path]`: the files removed.
    """
    path = Path(path)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for candidate in path.parent.iterdir():
            match = _TEMPORARY.match(candidate.name)
            if match is None or match["target"] != path.name or _process_alive(int(match["pid"])):
                continue
            _unlink(candidate)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; an absurd pid is none of ours
        return pid <= 2**22
    return True


def _copy(src: int, dst: int, size: int) -> None:
    copied = 0
    while copied < size:
        step = min(_COPY_STEP, size - copied)
        try:
            n = os.copy_file_range(src, dst, step)
        except OSError:  # cross-device or unsupported: fall back to sendfile
            n = os.sendfile(dst, src, None, step)
        if n <= 0:
            raise OSError(f"short copy while assembling the container: {copied} of {size} bytes")
        copied += n


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
