"""Checks of user arguments by kind, shared by the public API and the CLI, run before any work.

Every public entry point (``dispatch_compressed``, ``load_compressed``, ``pack``, ``dispatch_synthetic``)
calls its ``check_*`` function first, and the CLI checks its options with the same functions, so one bad
value gets one refusal everywhere. A check names the argument the way the caller spells it
(``budget_gb`` in Python, ``--budget-gb`` or ``CHECKPOINT`` on the command line) and its hint shows a value
of the right kind in that spelling (``budget_gb=2`` or ``--budget-gb 2``).

A value of the wrong type raises ``TypeError``; a value of the right type that cannot work raises
:class:`~offload_runtime.errors.UsageError` (a ``ValueError``), or for an input path that does not exist
:class:`~offload_runtime.errors.MissingFileError` (a ``FileNotFoundError``). Checks validate kinds:
finite positive numbers, positive integers, an existing file rather than a folder, a writable output
location that is not an input, a device this machine has.

Importing this module imports neither torch nor transformers (the CLI imports it while parsing).
"""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
VERIFY_POLICIES = ("once", "always", "never")  # the reader's (loaders.reader.VERIFY_POLICIES)
EXPERT_GRANULARITIES = ("auto", "expert", "block")  # expert_dispatch.ExpertOptions.experts
EXPERT_CACHE_MODES = ("auto", "compressed", "decoded")  # "auto" or scheduler.experts_plan.ENTRY_MODES
EXPERT_POLICIES = ("layer-lru", "lru", "lfu")  # scheduler.expert_cache.POLICIES
_DEVICE = re.compile(r"(?P<type>cpu|cuda)(?::(?P<index>\d+))?")


def is_cli_name(name: str) -> bool:
    """True for command-line spellings: ``--budget-gb`` (an option) or ``CHECKPOINT`` (a positional)."""
    return name.startswith("-") or name.isupper()


def spell(name: str, value: Any) -> str:
    """``name`` given ``value``, as the caller would type it: ``--budget-gb 2`` or ``budget_gb=2``."""
    if name.startswith("-"):
        return f"{name} {value}"
    if name.isupper():
        return str(value)
    return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"


def usage_error(summary: str, hint: str | None = None, **fields: Any) -> Exception:
    """A :class:`~offload_runtime.errors.UsageError` (imported on demand: the errors module needs torch)."""
    from offload_runtime.errors import UsageError

    return UsageError(summary, hint=hint, **fields)


def missing_file_error(summary: str, hint: str | None = None, **fields: Any) -> Exception:
    """A :class:`~offload_runtime.errors.MissingFileError` (imported on demand)."""
    from offload_runtime.errors import MissingFileError

    return MissingFileError(summary, hint=hint, **fields)


# -- numbers -----------------------------------------------------------------------------------------


def _real(value: Any, name: str, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of {unit}, got {type(value).__name__} {value!r}")
    return float(value)


def positive_number(value: Any, name: str, *, unit: str = "GiB", example: Any = 2) -> float:
    """``value`` as a float, when it is a finite number above 0 (not NaN, not infinite)."""
    number = _real(value, name, unit)
    if not math.isfinite(number) or number <= 0:
        raise usage_error(
            f"{name} must be a positive number of {unit}, got {value!r}", f"give e.g. {spell(name, example)}"
        )
    return number


def non_negative_number(value: Any, name: str, *, unit: str = "GiB", example: Any = 0) -> float:
    """``value`` as a float, when it is a finite number of at least 0."""
    number = _real(value, name, unit)
    if not math.isfinite(number) or number < 0:
        raise usage_error(
            f"{name} must be a finite number of {unit}, 0 or more, got {value!r}",
            f"give e.g. {spell(name, example)}",
        )
    return number


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _int_at_least(value: Any, name: str, minimum: int, example: Any) -> int:
    number = _integer(value, name)
    if number < minimum:
        raise usage_error(
            f"{name} must be an integer of {minimum} or more, got {value!r}",
            f"give e.g. {spell(name, example)}",
        )
    return number


def positive_int(value: Any, name: str, *, example: Any = 1) -> int:
    """``value`` as an int, when it is an integer of at least 1."""
    return _int_at_least(value, name, 1, example)


def non_negative_int(value: Any, name: str, *, example: Any = 0) -> int:
    """``value`` as an int, when it is an integer of at least 0."""
    return _int_at_least(value, name, 0, example)


def int_between(value: Any, name: str, low: int, high: int, *, example: Any) -> int:
    """``value`` as an int, when it is an integer from ``low`` to ``high``."""
    number = _integer(value, name)
    if not low <= number <= high:
        raise usage_error(
            f"{name} must be an integer from {low} to {high}, got {value!r}",
            f"give e.g. {spell(name, example)}",
        )
    return number


def one_of(value: Any, name: str, choices: Collection[str]) -> str:
    """``value`` when it is one of ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {', '.join(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise usage_error(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def codec_name(value: Any, name: str = "codec") -> str:
    """``value`` when it is a string (the codec registry refuses unknown names, listing the known ones)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a codec name (a string), got {type(value).__name__} {value!r}")
    return value


# -- devices -----------------------------------------------------------------------------------------


def device(value: Any, name: str = "device") -> None:
    """Check that ``value`` (``None``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, an int or a ``torch.device``)
    names a device this runtime runs on and this machine has. ``None`` means "CUDA when available"."""
    if value is None:
        return
    torch = sys.modules.get("torch")  # a torch.device implies torch is imported
    is_device = torch is not None and isinstance(value, torch.device)
    if isinstance(value, bool) or not (isinstance(value, (str, int)) or is_device):
        raise TypeError(f"{name} must be a string such as 'cuda' or 'cpu', got {type(value).__name__}")
    text = f"cuda:{value}" if isinstance(value, int) else str(value)
    match = _DEVICE.fullmatch(text)
    if match is None or (match["type"] == "cpu" and match["index"] not in (None, "0")):
        raise usage_error(
            f"{name} {text!r} is not a device offload_runtime runs on",
            f"use {spell(name, 'cuda')} (or cuda:N) for a GPU, {spell(name, 'cpu')} for the CPU",
        )
    if match["type"] == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this build of torch ({torch.__version__}) has no CUDA support"
        else:
            why = "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)"
        raise usage_error(f"{name} {text!r} asked for, but {why}", f"use {spell(name, 'cpu')}")
    count = torch.cuda.device_count()
    if match["index"] is not None and int(match["index"]) >= count:
        raise usage_error(
            f"{name} {text!r} does not exist: torch sees {count} CUDA device(s)",
            f"use one of {', '.join(f'cuda:{i}' for i in range(count))}",
        )


# -- paths -------------------------------------------------------------------------------------------


def path_argument(value: Any, name: str) -> Path:
    """``value`` as a ``Path`` when it is a non-empty ``str`` or ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    if os.fspath(value) == "":
        raise usage_error(f"{name} is an empty path", "give a file name")
    return Path(value)


def existing_path(value: Any, name: str) -> Path:
    """``value`` as a ``Path`` that exists (a file or a folder)."""
    path = path_argument(value, name)
    if not path.exists():
        raise missing_file_error(f"no such file or directory: {path}", file=path)
    return path


def _looks_like_model_folder(path: Path) -> bool:
    return any(
        (path / f).is_file() for f in ("config.json", "model.safetensors", "model.safetensors.index.json")
    )


def _pack_hint(name: str, source: Path) -> str:
    if is_cli_name(name):
        return f"pack it first: offload-runtime pack {source} OUT.safetensors"
    return f"pack it first: offload_runtime.pack({str(source)!r}, 'model.safetensors')"


def container_file(value: Any, name: str) -> Path:
    """``value`` as the ``Path`` of an existing, readable file that is not a folder nor a GGUF file.

    Whether it is a valid container is the reader's business (it validates the whole index on open).
    """
    path = existing_path(value, name)
    if path.is_dir():
        if _looks_like_model_folder(path):
            raise usage_error(
                f"{name} {path} is a model folder, not a container made by pack",
                _pack_hint(name, path),
                file=path,
            )
        raise usage_error(
            f"{name} {path} is a folder, not a container file", "give the container's file path", file=path
        )
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except PermissionError:
        raise usage_error(
            f"cannot read {path}: permission denied", "check its permissions", file=path
        ) from None
    if magic == GGUF_MAGIC:
        raise usage_error(
            f"{name} {path} is a GGUF file, not a container made by pack", _pack_hint(name, path), file=path
        )
    return path


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one file: same resolved path, or same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist
        return False


def output_file(
    value: Any,
    name: str,
    *,
    inputs: Iterable[Path] = (),
    overwrite: bool = False,
    force: str = "overwrite=True",
) -> Path:
    """``value`` as the ``Path`` of a file that may be written: not a folder, in an existing writable
    folder, never one of ``inputs`` (compared by resolved path and by inode), and not an existing file
    unless ``overwrite``.

    Args:
        value: the output path.
        name (`str`): how the caller spells the argument (``out``, ``OUT``).
        inputs (`Iterable[Path]`): every file the operation reads.
        overwrite (`bool`): whether an existing file (that is not an input) may be replaced.
        force (`str`): how the caller asks for ``overwrite`` (``overwrite=True``, ``--force``).
    """
    path = path_argument(value, name)
    text = os.fspath(value)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise usage_error(
            f"{name} {text} is a folder, not a file", f"give a file path, e.g. {path / 'model.safetensors'}"
        )
    parent = Path(os.path.abspath(path)).parent
    if not parent.exists():
        raise usage_error(
            f"the folder of {name} does not exist: {parent}",
            "create it first, or choose another path",
            file=path,
        )
    if not parent.is_dir():
        raise usage_error(
            f"{parent} (the folder of {name}) is not a folder", "choose another path", file=path
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise usage_error(
            f"cannot write into {parent}: permission denied", "choose another folder", file=path
        )
    for source in inputs:
        if same_file(path, source):
            raise usage_error(
                f"{name} {text} is {source}, a file this reads: writing it would destroy the source",
                "choose another output path",
                file=path,
            )
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise usage_error(
            f"{name} {text} already exists", f"choose another path, or pass {force} to replace it", file=path
        )
    return path


# -- the public API ----------------------------------------------------------------------------------


def check_expert_options(
    experts: Any = "auto", expert_cache: Any = "auto", expert_policy: Any = "layer-lru"
) -> None:
    """A mixture of experts' granularity, expert cache entries and the cache's replacement policy (checked
    when ``expert_dispatch.ExpertOptions`` is made: the entry points make it before any work)."""
    one_of(experts, "experts", EXPERT_GRANULARITIES)
    one_of(expert_cache, "expert_cache", EXPERT_CACHE_MODES)
    one_of(expert_policy, "expert_policy", EXPERT_POLICIES)


def check_run_options(
    budget_gb: Any,
    *,
    device_: Any = None,
    prefetch: Any = 1,
    host_budget_gb: Any = None,
    verify: Any = None,
) -> None:
    """The options ``dispatch_compressed``, ``load_compressed`` and ``dispatch_synthetic`` share."""
    positive_number(budget_gb, "budget_gb")
    positive_int(prefetch, "prefetch")
    if host_budget_gb is not None:
        non_negative_number(host_budget_gb, "host_budget_gb", example=8)
    if verify is not None:
        one_of(verify, "verify", VERIFY_POLICIES)
    device(device_)


def check_dtype(value: Any, name: str = "dtype") -> None:
    """``None`` or a floating ``torch.dtype``."""
    if value is None:
        return
    import torch

    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype such as torch.bfloat16, got {type(value).__name__}")
    if not value.is_floating_point:
        raise usage_error(f"{name} must be a floating dtype, got {value}", f"give e.g. {name}=torch.bfloat16")


def _check_codec(codec: Any, device_: Any, name: str = "codec") -> None:
    """A codec name the registry knows and that can run where the model will be decoded."""
    codec_name(codec, name)
    if codec != "auto":
        from offload_runtime.native import resolve_codec

        resolve_codec(codec, None, device_)  # CodecUnavailableError: unknown, or not runnable here


def check_dispatch(
    model: Any,
    budget_gb: Any,
    *,
    checkpoint: Any,
    device_: Any,
    codec: Any,
    prefetch: Any,
    host_budget_gb: Any,
    verify: Any,
) -> None:
    """The arguments of :func:`~offload_runtime.dispatch_compressed`."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_run_options(
        budget_gb, device_=device_, prefetch=prefetch, host_budget_gb=host_budget_gb, verify=verify
    )
    if checkpoint is not None:
        container_file(checkpoint, "checkpoint")
    else:
        _check_codec(codec, device_)


def check_load(
    path: Any, budget_gb: Any, *, device_: Any, prefetch: Any, host_budget_gb: Any, verify: Any
) -> Path:
    """The arguments of :func:`~offload_runtime.load_compressed`; returns the container's path."""
    container = container_file(path, "path")
    check_run_options(
        budget_gb, device_=device_, prefetch=prefetch, host_budget_gb=host_budget_gb, verify=verify
    )
    return container


def check_pack(
    src: Any,
    out: Any,
    *,
    codec: Any,
    dtype: Any,
    device_: Any,
    overwrite: bool,
    tokenizer: Any = None,
    tp_slices: Any = None,
    names: tuple[str, str, str] = ("src", "out", "overwrite=True"),
):
    """The arguments of :func:`~offload_runtime.pack`: source, output, codec, dtype, device, slices.

    Args:
        names: how the caller spells the source, the output and the request to overwrite
            (``("SRC", "OUT", "--force")`` on the command line).

    Returns:
        `(PackSource | None, Path)`: what the source is and reads (``None`` for a module), and the output.
    """
    from torch import nn

    from offload_runtime.loaders.pack_source import describe_source
    from offload_runtime.loaders.tp import shard_specs
    from offload_runtime.loaders.tp_slices import MAX_TP_SLICES

    src_name, out_name, force = names
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    if tp_slices is not None:
        int_between(tp_slices, "tp_slices", 2, MAX_TP_SLICES, example=2)
        if isinstance(src, nn.Module) and shard_specs(src):
            raise usage_error(
                "tp_slices slices an unsharded model; this one is already tensor parallel",
                "pack the model before sharding it, or leave tp_slices out",
            )
    check_dtype(dtype)
    device(device_)
    _check_codec(codec, device_)
    source = None if isinstance(src, nn.Module) else describe_source(src, src_name)
    inputs = source.inputs if source is not None else ()
    return source, output_file(out, out_name, inputs=inputs, overwrite=overwrite, force=force)


def check_synthetic(
    name_or_config: Any,
    budget_gb: Any,
    *,
    codec: Any,
    device_: Any,
    prefetch: Any,
    host_budget_gb: Any,
    seed: Any,
    dtype: Any,
    name: str = "name_or_config",
) -> None:
    """The arguments of :func:`~offload_runtime.synthetic.dispatch_synthetic`."""
    from offload_runtime.synthetic import SYNTHETIC_SHAPES

    if isinstance(name_or_config, str):
        one_of(name_or_config, name, sorted(SYNTHETIC_SHAPES))
    check_run_options(budget_gb, device_=device_, prefetch=prefetch, host_budget_gb=host_budget_gb)
    non_negative_int(seed, "seed")
    check_dtype(dtype)
    _check_codec(codec, device_)
