"""From a container back to PyTorch: state dicts, empty models from the stored config, tokenizers."""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from offload_runtime.errors import CheckpointError, CheckpointMismatchError
from offload_runtime.loaders.format import TOKENIZER_BINARY_SUFFIX
from offload_runtime.loaders.reader import ContainerReader
from offload_runtime.loaders.tp import local_state_dict
from offload_runtime.native.layout import torch_dtype


def load_state_dict(reader: ContainerReader) -> dict[str, torch.Tensor]:
    """Decode every group on the CPU into a state dict.

    Args:
        reader (`ContainerReader`): the open container.

    Returns:
        `dict[str, torch.Tensor]`: every stored tensor (each with its own storage) and every tied alias,
        which maps to the *same* tensor object as the name it shares.
    """
    state: dict[str, torch.Tensor] = {}
    for group in reader.groups:
        buffer = torch.empty(group.layout.size, dtype=torch.uint8)
        reader.decode_cpu(group.name, buffer)
        for name, view in group.layout.views(buffer).items():
            state[name] = view.clone()
        del buffer
    for group in reader.groups:
        for alias, canonical in group.aliases.items():
            state[alias] = state[canonical]
    return state


def empty_model_from_config(config: dict, model_class: str | None, *, file=None, dtype: str | None = None):
    """A transformers model of ``config`` with parameters on ``meta`` (buffers stay real)."""
    import transformers
    from accelerate import init_empty_weights

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("stored config has no model_type", file=file)
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"transformers {transformers.__version__} cannot build the stored config: {exc}",
            file=file,
            actual=model_type,
            hint="upgrade transformers, or check the config's model_type",
        ) from exc
    class_name = model_class or (hf_config.architectures or [None])[0]
    cls = getattr(transformers, class_name, None) if class_name else None
    if cls is None:
        raise CheckpointError(
            "cannot find the model class of the stored config",
            file=file,
            actual=class_name,
            hint="upgrade transformers, or build the model yourself and use load_state_dict",
        )
    kwargs = {"dtype": torch_dtype(dtype)} if dtype else {}
    with init_empty_weights():
        model = cls._from_config(hf_config, **kwargs)
    if hasattr(model, "tie_weights"):  # on meta, ties are not made at construction: find_groups needs them
        model.tie_weights()
    return model.eval()


def build_empty_model(reader: ContainerReader) -> nn.Module:
    """The model described by the container's stored config, weights on ``meta``, buffers real.

    Raises:
        CheckpointError: the container holds no config (packed from a bare ``.safetensors`` file).
    """
    index = reader.index
    if index.config is None:
        raise CheckpointError(
            "container holds no model config",
            file=reader.path,
            hint="pack from a model or a directory with config.json, or build the model yourself",
        )
    model = empty_model_from_config(index.config, index.model_class, file=reader.path, dtype=index.dtype)
    if index.generation_config is not None and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(index.generation_config)
    return model


def check_compatible(reader: ContainerReader, model: nn.Module) -> None:
    """Check that the container holds exactly ``model``'s parameters and persistent buffers.

    Raises:
        CheckpointMismatchError: listing every missing and unexpected tensor and every shape/dtype difference.
    """
    stored = {}
    for group in reader.groups:
        if group.expert is not None:  # expert groups (a reader at expert granularity) hold slices
            for spec, piece in zip(group.layout.tensors, group.expert.slices, strict=True):
                stored[piece.param] = (tuple(piece.shape), spec.torch_dtype)
            continue
        for spec in group.layout.tensors:
            stored[spec.name] = (tuple(spec.shape), spec.torch_dtype)
        for alias, canonical in group.aliases.items():
            if canonical in stored:
                stored[alias] = stored[canonical]
    # a tensor-parallel model's container holds this rank's shards: compare local shapes
    expected = {name: (tuple(t.shape), t.dtype) for name, t in local_state_dict(model).items()}
    problems = [
        f"missing from the container: {n} {expected[n][0]} {expected[n][1]}"
        for n in expected
        if n not in stored
    ]
    problems += [f"unexpected in the container: {n}" for n in stored if n not in expected]
    for name in expected.keys() & stored.keys():
        (want_shape, want_dtype), (have_shape, have_dtype) = expected[name], stored[name]
        if want_shape != have_shape:
            problems.append(f"{name}: container shape {have_shape}, model shape {want_shape}")
        if want_dtype != have_dtype:
            problems.append(f"{name}: container dtype {have_dtype}, model dtype {want_dtype}")
    if problems:
        raise CheckpointMismatchError(
            f"container does not fit {type(model).__name__}: {len(problems)} difference(s)",
            file=reader.path,
            mismatches=sorted(problems),
        )


def load_model(reader: ContainerReader) -> nn.Module:
    """The whole model rebuilt from the container alone, on the CPU (``build_empty_model`` + weights)."""
    model = build_empty_model(reader)
    check_compatible(reader, model)
    model.load_state_dict(load_state_dict(reader), strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def load_tokenizer(path: str | os.PathLike | ContainerReader):
    """Rebuild the tokenizer stored in a container.

    Args:
        path (`str`, `os.PathLike` or `ContainerReader`): the container.

    Raises:
        UsageError: ``path`` is a folder or a GGUF file (``MissingFileError``: it does not exist).
        CheckpointError: the container holds no tokenizer.
    """
    from transformers import AutoTokenizer

    if isinstance(path, ContainerReader):
        files, where = path.index.tokenizer, path.path
    else:
        from offload_runtime.validate_args import container_file

        with ContainerReader(container_file(path, "path")) as reader:
            files, where = reader.index.tokenizer, reader.path
    if not files:
        raise CheckpointError("container holds no tokenizer", file=where, hint="pack it with tokenizer=...")
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            if Path(name).name != name:
                raise CheckpointError("tokenizer file name is not a plain file name", file=where, actual=name)
            if name.endswith(TOKENIZER_BINARY_SUFFIX):  # binary (sentencepiece model), base64 in the index
                try:
                    data = base64.b64decode(text, validate=True)
                except ValueError:
                    raise CheckpointError("tokenizer file is not base64", file=where, actual=name) from None
                (Path(tmp) / name.removesuffix(TOKENIZER_BINARY_SUFFIX)).write_bytes(data)
            else:
                (Path(tmp) / name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)
