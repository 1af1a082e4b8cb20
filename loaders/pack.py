"""``pack``: a model (module, HF directory or ``.safetensors`` file) -> a container, group by group.

Only one group is decoded-size resident at a time: its tensors are copied (or ``pread`` from disk) straight
into the group's layout buffer, encoded, and the payload streamed to the writer before the next group.

A mixture of experts is stored one group per routed expert (``find_groups(model, experts=True)``): an
expert group's tensors are slices ``param[e]`` of the stacked parameters, read one slice at a time from
the module, from stacked tensors in the checkpoint, or from its per-expert tensors
(``legacy_experts.py``).

With ``tp_slices=S`` the tensors the model's tensor-parallel plan shards are stored in ``S`` slice groups
per group (``tp_slices.py``), so that each rank of a tensor-parallel run reads only its part.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from offload_runtime.display import ByteBar
from offload_runtime.errors import CheckpointMismatchError, UsageError
from offload_runtime.loaders.format import TOKENIZER_BINARY_SUFFIX, TP_SLICE_KIND, TpSlice, tp_slice_name
from offload_runtime.loaders.groups import GroupSpec, find_groups
from offload_runtime.loaders.legacy_experts import ConversionRules, StackedFromExperts
from offload_runtime.loaders.moe import parse_slice_name
from offload_runtime.loaders.pack_source import PackSource
from offload_runtime.loaders.sources import ModuleSource, SafetensorsSource, SlicedSource, TensorSource
from offload_runtime.loaders.tp import local_state_dict, planned_shard_dims
from offload_runtime.loaders.tp_slices import slice_group
from offload_runtime.loaders.writer import ContainerWriter
from offload_runtime.native.base import EncodedGroup, GroupCodec, HostBuffer
from offload_runtime.native.layout import GroupLayout
from offload_runtime.validate_args import check_pack


@dataclass
class _Plan:
    groups: list[GroupSpec]
    source: TensorSource
    model_class: str | None = None
    config: dict | None = None
    generation_config: dict | None = None
    tokenizer: dict[str, str] | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    shard_dims: dict[str, tuple[int, int]] = field(default_factory=dict)  # the model's TP plan, per tensor


def pack(
    src: nn.Module | str | os.PathLike,
    out: str | os.PathLike,
    codec: str = "auto",
    progress: bool = True,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    tp_slices: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Pack a model into a container at ``out``, atomically.

    Every argument is checked before anything is read (``offload_runtime.validate_args.check_pack``):
    ``pack`` never writes over a file it reads (the weights, an index and its shards, the config, the
    tokenizer files; compared by resolved path and by inode), nor over any existing file unless
    ``overwrite``.

    Args:
        src (`nn.Module`, `str` or `os.PathLike`): a model, an HF model directory (``config.json`` and
            ``model.safetensors`` or a sharded ``model.safetensors.index.json``), one ``.safetensors``
            file (with a ``config.json`` beside it if any; otherwise groups come from name prefixes), or
            a GGUF file (loaded through transformers: quantised tensors are de-quantised to ``dtype``,
            float32 by default, so the container is lossless relative to the de-quantised weights and
            larger than the GGUF file; the tokenizer it carries is stored too).
        out (`str` or `os.PathLike`): the container to write, in an existing folder.
        codec (`str`, defaults to `"auto"`): ``auto``, ``raw``, ``zstd``, ``ans``, ``int8`` or
            ``fused12``; ``auto`` picks per group (``offload_runtime.native.resolve_codec``).
        progress (`bool`, defaults to `True`): show a progress bar on stderr (MiB, groups, ratio so far).
        tokenizer (*optional*): a tokenizer whose files are stored in the container (``load_tokenizer``
            rebuilds it). For a directory source, tokenizer files found there are stored when this is None.
        dtype (`torch.dtype`, *optional*): convert floating tensors to this dtype first (a GGUF source:
            the dtype quantised tensors are de-quantised to; float32 when ``None``).
        device (`torch.device` or `str`, *optional*): where the container will be decoded; ``auto`` (and
            ``int8``'s inner codec) then pick codecs that decode there (``"cpu"``: never ``ans``). ``None``
            means the GPU when there is one.
        tp_slices (`int`, *optional*): store every tensor the model's tensor-parallel plan shards in this
            many slices (format version 3), so that ``load_compressed`` on each of ``N`` ranks of a
            tensor-parallel run, ``N`` dividing ``tp_slices``, reads only its slices. ``src`` must be the
            unsharded model (or its directory) and have a ``tp_plan``.
        overwrite (`bool`, defaults to `False`): replace ``out`` if it exists (never when it is an input).

    Returns:
        `pathlib.Path`: ``out``.

    Raises:
        MissingFileError: ``src`` does not exist or lacks its weights or config (naming what is missing).
        UsageError: ``out`` is a folder, is in a folder that does not exist or cannot be written, is one
            of the files ``src`` reads, or exists and ``overwrite`` is False; a bad ``dtype`` or device;
            ``tp_slices`` out of range, or given for a model already tensor parallel or without a
            tensor-parallel plan.
        CodecUnavailableError: an unknown codec, or one that cannot run here.
        CheckpointMismatchError: a directory's weights do not fit the model its config describes.
    """
    source, out = check_pack(
        src,
        out,
        codec=codec,
        dtype=dtype,
        device_=device,
        overwrite=overwrite,
        tokenizer=tokenizer,
        tp_slices=tp_slices,
    )
    plan = _plan(src if source is None else source, dtype, progress)
    try:
        if tp_slices is not None and not plan.shard_dims:
            raise UsageError(
                f"tp_slices needs a model with a tensor-parallel plan (tp_plan); {src} has none",
                hint="leave tp_slices out",
            )
        if tokenizer is not None:
            plan.tokenizer = tokenizer_files(tokenizer)
        return _write(plan, out, codec, progress, dtype, device, tp_slices)
    finally:
        for fn in plan.cleanup:
            fn()


def _write(
    plan: _Plan,
    out: Path,
    codec: str,
    progress: bool,
    dtype: torch.dtype | None,
    device: torch.device | str | None = None,
    tp_slices: int | None = None,
) -> Path:
    layouts = [_layout(spec, plan.source, dtype) for spec in plan.groups]
    stored_dtype = _main_float_dtype(layouts)
    config = dict(plan.config) if plan.config is not None else None
    if config is not None and stored_dtype is not None:
        config["dtype"] = stored_dtype
    total = sum(layout.size for layout in layouts)
    try:
        writer = ContainerWriter(out)
    except OSError as exc:  # the writer's temporary file beside ``out`` cannot be created: name ``out``
        raise UsageError(
            f"cannot write {out}: {exc.strerror or exc}", file=out, hint="choose a folder you can write to"
        ) from exc
    bar = ByteBar(total, f"pack {out.name}", enabled=progress)
    host = HostBuffer(pinned=True)  # what GPU encoders copy back, reused group after group
    decoded = stored = 0
    with bar, writer:
        writer.set_model_info(
            model_class=plan.model_class,
            config=config,
            generation_config=plan.generation_config,
            tokenizer=plan.tokenizer,
            dtype=stored_dtype,
        )
        for i, (spec, layout) in enumerate(zip(plan.groups, layouts, strict=True)):
            data_tensor = torch.zeros(layout.size, dtype=torch.uint8)
            for name, view in layout.views(data_tensor).items():
                plan.source.fill(name, view)
            sliced = slice_group(layout, _group_dims(spec, plan.shard_dims), tp_slices) if tp_slices else None
            if sliced is None:
                stored += _add(writer, spec, layout, data_tensor, codec, device, host)
            else:  # the group's whole tensors, then each slice (tp_slices.py)
                part = torch.zeros(sliced.base.size, dtype=torch.uint8)
                sliced.fill_base(data_tensor, part)
                base_codec = codec if sliced.base.size else "raw"  # every tensor sliced: nothing to compress
                stored += _add(writer, spec, sliced.base, part, base_codec, device, host, tp=sliced.tp)
                for s, slice_layout in enumerate(sliced.slices):
                    part = torch.zeros(slice_layout.size, dtype=torch.uint8)
                    sliced.fill_slice(s, data_tensor, part)
                    name = tp_slice_name(spec.name, s)
                    slice_spec = GroupSpec(name, TP_SLICE_KIND, [], list(spec.users))
                    stored += _add(
                        writer,
                        slice_spec,
                        slice_layout,
                        part,
                        codec,
                        device,
                        host,
                        tp_slice=TpSlice(spec.name, s),
                    )
                del part
            decoded += layout.size
            del data_tensor
            bar.update(layout.size)
            bar.set_postfix(groups=f"{i + 1}/{len(layouts)}", ratio=f"{decoded / max(stored, 1):.3f}")
    return out


def _add(
    writer: ContainerWriter,
    spec: GroupSpec,
    layout: GroupLayout,
    data: torch.Tensor,
    codec: str,
    device: torch.device | str | None,
    host: HostBuffer,
    **records,
) -> int:
    """Encode one stored group (on the GPU, through ``host``, when its codec encodes there) and hand it to
    the writer; returns its payload bytes."""
    group_codec = _resolve_codec(codec, layout, device)
    gpu = _encode_device(device) if group_codec.encodes_on_device else None
    if gpu is not None:
        encoded = _encode_on_device(group_codec, layout, data, gpu, host)
    else:
        encoded = group_codec.encode(layout, data.numpy())
    writer.add_group(spec, layout, encoded, group_codec.name, **records)
    return int(encoded.payload.nbytes)


def _encode_device(device: torch.device | str | int | None) -> torch.device | None:
    """The GPU a codec that encodes on the device packs on: the one the container is for (``None``: the
    GPU when there is one), or ``None`` for the CPU."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else None
    chosen = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return chosen if chosen.type == "cuda" else None


def _encode_on_device(
    group_codec: GroupCodec, layout: GroupLayout, data: torch.Tensor, device: torch.device, host: HostBuffer
) -> EncodedGroup:
    """Encode on the GPU the container is packed for (fused12: ~10x the CPU encoder's rate on a 16-core
    host); the payload is the CPU encoder's, byte for byte (plain integer torch, tested on the GPU)."""
    held = [data.to(device)]
    encoded = group_codec.encode_tensor(layout, held, host_buffer=host)
    payload = torch.empty(encoded.stored_size, dtype=torch.uint8)
    encoded.write(payload)
    return EncodedGroup(payload.numpy(), encoded.chunks, encoded.params, encoded.stored_layout)


def _group_dims(spec: GroupSpec, dims: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """``(dim, split)`` of the group's tensors the TP plan shards; an expert's slice ``param[e]`` is cut like
    ``param``, one dimension lower (a plan cutting dimension 0 shards experts across ranks: left whole)."""
    out = {}
    for name in spec.tensors:
        sliced = parse_slice_name(name)
        if sliced is None:
            if name in dims:
                out[name] = dims[name]
        elif dims.get(sliced[0], (0, 0))[0] > 0:
            dim, split = dims[sliced[0]]
            out[name] = (dim - 1, split)
    return out


def _layout(spec: GroupSpec, source: TensorSource, dtype: torch.dtype | None) -> GroupLayout:
    rows = []
    for name in spec.tensors:
        tensor_dtype, shape = source.dtype_shape(name)
        if dtype is not None and tensor_dtype.is_floating_point:
            tensor_dtype = dtype
        rows.append((name, tensor_dtype, shape))
    return GroupLayout.from_shapes(rows)


def _main_float_dtype(layouts: list[GroupLayout]) -> str | None:
    counts: dict[str, int] = {}
    for layout in layouts:
        for t in layout.tensors:
            if t.torch_dtype.is_floating_point:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
    return max(counts, key=counts.__getitem__) if counts else None


def _resolve_codec(
    name: str, layout: GroupLayout | None, device: torch.device | str | None = None
) -> GroupCodec:
    from offload_runtime.native import resolve_codec

    return resolve_codec(name, layout, device)


# -- sources -----------------------------------------------------------------------------------------


def _plan(src: nn.Module | PackSource, dtype: torch.dtype | None, progress: bool) -> _Plan:
    if isinstance(src, nn.Module):
        return _plan_module(src)
    if src.kind == "gguf":
        from offload_runtime.loaders.gguf import load_gguf

        model, tokenizer = load_gguf(src.path, dtype, progress)
        plan = _plan_module(model)
        plan.tokenizer = tokenizer_files(tokenizer)
        return plan
    if src.config_dir is not None:
        return _plan_pretrained(src, src.weights)
    return _plan_bare_file(src.path)


def _model_info(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)
    return {
        "model_class": type(model).__name__ if config is not None else None,
        "config": config.to_dict() if config is not None else None,
        "generation_config": generation.to_dict() if generation is not None else None,
    }


def _plan_module(model: nn.Module) -> _Plan:
    source = SlicedSource(ModuleSource(local_state_dict(model)))  # a TP model packs this rank's shards
    plan = _Plan(find_groups(model, experts=True), source, **_model_info(model))
    plan.shard_dims = planned_shard_dims(model)
    return plan


def _plan_pretrained(src: PackSource, files: list[Path]) -> _Plan:
    """Groups from the model the config describes (built on ``meta``), tensors from the safetensors files."""
    from offload_runtime.loaders.load import empty_model_from_config

    directory = src.config_dir
    config = json.loads((directory / "config.json").read_text())
    model = empty_model_from_config(config, None, file=directory / "config.json")
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    groups = find_groups(model, experts=True)
    source = SafetensorsSource(files)
    buffers = dict(model.named_buffers())
    renamed = _RenamedSource(
        source, ModuleSource(buffers), ConversionRules.for_model_type(config.get("model_type"))
    )
    prefix = getattr(model, "base_model_prefix", "") or ""
    problems = []
    for spec in groups:
        if spec.expert is not None:  # bind the stacked parameters once, with expert 0
            if spec.expert.index == 0:
                for s in spec.expert.slices:
                    problem = renamed.bind_stacked(s.param, prefix, model)
                    if problem:
                        problems.append(problem)
            continue
        candidates = {name: [name] for name in spec.tensors}
        for alias, canonical in spec.aliases.items():
            candidates[canonical].append(alias)
        for name in spec.tensors:
            problem = renamed.bind(name, candidates[name], prefix, model)
            if problem:
                problems.append(problem)
    if problems:
        source.close()
        raise CheckpointMismatchError(
            "checkpoint does not fit the model its config describes", file=directory, mismatches=problems
        )
    plan = _Plan(groups, SlicedSource(renamed), **_model_info(model), cleanup=[source.close])
    plan.shard_dims = planned_shard_dims(model)
    if src.tokenizer_files:
        plan.tokenizer = dict(_tokenizer_entry(f) for f in src.tokenizer_files)
    return plan


def _tokenizer_entry(file: Path) -> tuple[str, str]:
    """``(name, text)`` for the index: the file's text, or its bytes base64-encoded if it is not UTF-8."""
    data = file.read_bytes()
    try:
        return file.name, data.decode("utf-8")
    except UnicodeDecodeError:
        return file.name + TOKENIZER_BINARY_SUFFIX, base64.b64encode(data).decode("ascii")


class _RenamedSource(TensorSource):
    """Model tensor names -> checkpoint names (HF prefixes, tied copies), falling back to real buffers."""

    def __init__(
        self, checkpoint: SafetensorsSource, buffers: ModuleSource, rules: ConversionRules | None = None
    ) -> None:
        self.checkpoint, self.buffers = checkpoint, buffers
        self.rules = rules or ConversionRules()
        self.stacked = StackedFromExperts(checkpoint)
        self.names: dict[str, tuple[TensorSource, str]] = {}

    def bind_stacked(self, name: str, prefix: str, model: nn.Module) -> str | None:
        """Bind a stacked experts parameter: stored whole, else assembled from per-expert tensors."""
        problem = self.bind(name, [name], prefix, model)
        if problem is None:
            return None
        legacy = self.stacked.add(name, self.rules, tuple(model.get_parameter(name).shape), prefix)
        if legacy is None:
            self.names[name] = (self.stacked, name)
            return None
        return legacy if self.rules.stackings else problem

    def bind(self, name: str, candidates: list[str], prefix: str, model: nn.Module) -> str | None:
        """Find ``name`` in the checkpoint; returns a mismatch line, or None when bound."""
        keys = []
        renamed = [v[0] for candidate in candidates for v in self.rules.variants([candidate])]
        for c in renamed:
            keys.append(c)
            if prefix and c.startswith(prefix + "."):
                keys.append(c[len(prefix) + 1 :])
            elif prefix:
                keys.append(f"{prefix}.{c}")
        expected = model.get_parameter(name) if _is_parameter(model, name) else None
        for key in keys:
            if key in self.checkpoint:
                _, shape = self.checkpoint.dtype_shape(key)
                if expected is not None and tuple(expected.shape) != shape:
                    return f"{name}: checkpoint shape {shape} ({key}), model expects {tuple(expected.shape)}"
                self.names[name] = (self.checkpoint, key)
                return None
        if name in self.buffers:  # persistent buffers computed by the model (position ids, ...)
            self.names[name] = (self.buffers, name)
            return None
        return f"{name}: missing from the checkpoint (looked for {', '.join(keys)})"

    def dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        source, key = self.names[name]
        return source.dtype_shape(key)

    def fill(self, name: str, dest: torch.Tensor) -> None:
        source, key = self.names[name]
        source.fill(key, dest)

    def fill_slice(self, name: str, index: int, dest: torch.Tensor) -> None:
        source, key = self.names[name]
        source.fill_slice(key, index, dest)


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


_BLOCK = re.compile(r"^(?P<block>.+?\.\d+)\.")


def _plan_bare_file(path: Path) -> _Plan:
    """No config: ``<prefix>.<int>.`` name runs become blocks, every other module a group of its own."""
    source = SafetensorsSource([path])
    groups: dict[str, GroupSpec] = {}
    for name in sorted(source.names(), key=_natural_key):
        match = _BLOCK.match(name)
        group, kind = (match["block"], "block") if match else (name.rpartition(".")[0] or name, "module")
        groups.setdefault(group, GroupSpec(group, kind, [], [group])).tensors.append(name)
    return _Plan(list(groups.values()), source, cleanup=[source.close])


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The files a tokenizer's ``save_pretrained`` writes, as index entries (binary ones base64-encoded)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return dict(_tokenizer_entry(f) for f in sorted(Path(tmp).iterdir()) if f.is_file())
