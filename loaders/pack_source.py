"""What ``pack`` reads, found before anything is read: the kind of source and every file it reads.

:func:`describe_source` classifies a path as

* ``"folder"``: a Hugging Face model folder, ``config.json`` with ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` (every shard it names must exist);
* ``"safetensors"``: one ``.safetensors`` file, with the config, generation config and tokenizer files of
  its folder when a ``config.json`` sits beside it (otherwise groups come from tensor-name prefixes);
* ``"gguf"``: a GGUF file, recognised by its magic bytes (loaded through transformers, which de-quantises
  it; the tokenizer it carries is kept),

and lists every file packing it reads (``inputs``), so that ``pack`` can refuse an output that is one of
them. A source that lacks something is refused naming what is missing and what was found instead; no
tensor is read here (only small JSON files and the first bytes of the weights file).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from offload_runtime.errors import CheckpointError, CorruptCheckpointError, MissingFileError, UsageError
from offload_runtime.loaders.format import FORMAT_NAME, MAX_HEADER_SIZE
from offload_runtime.validate_args import GGUF_MAGIC, existing_path, is_cli_name

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
BINARY_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")  # sentencepiece
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SOURCE_KINDS = "a Hugging Face model folder, a .safetensors file or a .gguf file"


@dataclass(frozen=True)
class PackSource:
    """A source path of ``pack`` and what packing it reads.

    Attributes:
        kind: ``"folder"``, ``"safetensors"`` or ``"gguf"``.
        path: the path given.
        weights: the weights files (safetensors shards, or the GGUF file).
        config_dir: the folder whose ``config.json`` describes the model (``None``: no config).
        inputs: every file packing reads (weights, index, configs, tokenizer files).
    """

    kind: str
    path: Path
    weights: list[Path]
    config_dir: Path | None = None
    inputs: list[Path] = field(default_factory=list)

    @property
    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files stored with the container (those of the config's folder)."""
        if self.config_dir is None:
            return []
        names = TOKENIZER_FILES + BINARY_TOKENIZER_FILES
        return [self.config_dir / n for n in names if (self.config_dir / n).is_file()]


def describe_source(src: str | os.PathLike, name: str = "src") -> PackSource:
    """Classify ``src`` and list the files packing it reads.

    Args:
        src (`str` or `os.PathLike`): an HF model folder, a ``.safetensors`` file or a ``.gguf`` file.
        name (`str`, defaults to `"src"`): how the caller spells the argument (``SRC`` on the command line).

    Raises:
        MissingFileError: ``src`` does not exist, or a folder lacks its weights or config (naming what it
            lacks and what it holds instead), or an index names shards that do not exist.
        UsageError: ``src`` is already a container, or cannot be read.
        CheckpointError: a file that is neither safetensors nor GGUF, or an index or config that is not JSON.
    """
    path = existing_path(src, name)
    if path.is_dir():
        return _describe_folder(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if head[:4] == GGUF_MAGIC:
                return PackSource("gguf", path, [path], None, [path])
            _check_safetensors_header(fh, head, path, name)
    except PermissionError:
        raise UsageError(
            f"cannot read {path}: permission denied", file=path, hint="check its permissions"
        ) from None
    folder = path.parent
    if not (folder / "config.json").is_file():
        return PackSource("safetensors", path, [path], None, [path])
    source = PackSource("safetensors", path, [path], folder)
    return _with_inputs(source, [path])


def _check_safetensors_header(fh, head: bytes, path: Path, name: str) -> None:
    size = os.fstat(fh.fileno()).st_size
    header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    first = fh.read(1) if 0 < header_len <= min(MAX_HEADER_SIZE, size - 8) else b""
    if first != b"{":
        raise CheckpointError(
            f"{path} is neither a safetensors nor a GGUF file",
            file=path,
            hint=f"pack reads {SOURCE_KINDS}",
        )
    try:
        header = json.loads(first + fh.read(header_len - 1))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"safetensors header is not JSON: {exc}", file=path) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(metadata, dict) and metadata.get("format") == FORMAT_NAME:
        where = "offload-runtime inspect/generate" if is_cli_name(name) else "load_compressed"
        raise UsageError(
            f"{path} is already an offload_runtime container", file=path, hint=f"use it as it is ({where})"
        )


def _describe_folder(folder: Path) -> PackSource:
    has_config = (folder / "config.json").is_file()
    if (folder / SINGLE_FILE).is_file():
        weights = [folder / SINGLE_FILE]
    elif (folder / INDEX_FILE).is_file():
        weights = _shards(folder / INDEX_FILE)
    else:
        missing = f"no {SINGLE_FILE} and no {INDEX_FILE}" + ("" if has_config else " (nor config.json)")
        raise MissingFileError(f"{folder} holds {missing}", file=folder, hint=_found_instead(folder))
    if not has_config:
        raise MissingFileError(
            f"{folder} holds {weights[0].name} but no config.json",
            file=folder,
            hint=f"add the model's config.json, or pack the file {weights[0]} alone (groups by tensor name)",
        )
    source = PackSource("folder", folder, weights, folder)
    index = [folder / INDEX_FILE] if weights[0].name != SINGLE_FILE else []
    return _with_inputs(source, weights + index)


def _with_inputs(source: PackSource, files: list[Path]) -> PackSource:
    folder = source.config_dir
    configs = [folder / f for f in ("config.json", "generation_config.json") if (folder / f).is_file()]
    try:
        json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config.json is not valid JSON: {exc}", file=folder / "config.json") from None
    inputs = [*files, *configs, *source.tokenizer_files]
    return PackSource(source.kind, source.path, source.weights, folder, inputs)


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{index.name} is not a JSON object: {exc}", file=index) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index.name} has no weight_map of tensor name -> shard file", file=index)
    shards = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise MissingFileError(
            f"{index.name} names {len(missing)} shard(s) missing from {index.parent}: {', '.join(missing)}",
            file=index,
            hint="download or copy the missing shards next to the index",
        )
    return shards


def _found_instead(folder: Path) -> str:
    """What to do with the files a folder holds instead of HF safetensors weights."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    gguf = [f for f in files if f.lower().endswith(".gguf")]
    other = [f for f in files if f.endswith(".safetensors")]
    if gguf:
        return f"it holds {', '.join(gguf)}: pack that file ({folder / gguf[0]})"
    if other:
        return f"it holds {', '.join(other)}: pack that file ({folder / other[0]})"
    if any(f.endswith((".bin", ".pt", ".pth")) for f in files):
        return "it holds PyTorch pickle weights: save the model with save_pretrained() (safetensors) first"
    return f"pack reads {SOURCE_KINDS}" + ("" if files else f"; {folder} is empty")
