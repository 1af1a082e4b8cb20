"""Checkpoints that keep one tensor per expert: read the stacked parameters' slices from them.

Hub checkpoints of Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE (and what ``save_pretrained`` writes for
them in transformers 5.x) store ``experts.<e>.w1.weight`` or ``experts.<e>.gate_proj.weight``, one tensor
per expert; transformers converts them when loading, following its checkpoint conversion mapping
(``get_checkpoint_conversion_mapping``): ``MergeModulelist(dim=0)`` stacks the experts and
``Concatenate(dim=1)`` joins gate and up into ``gate_up_proj``. ``pack`` reads them the other way round,
one expert at a time: slice ``e`` of a stacked parameter is the concatenation along dimension 0 of the
listed source tensors of expert ``e``. Renamings whose patterns are plain strings (Mixtral's
``.block_sparse_moe.`` -> ``.mlp.``) are reversed for every name.

Supported converters: operations ``[MergeModulelist(0)]`` or ``[MergeModulelist(0), Concatenate(1)]``;
a stacked parameter no supported converter produces stays reported as missing from the checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from offload_runtime.loaders.sources import TensorSource

_PLAIN = re.compile(r"^[\w.]+$")  # a pattern that matches itself only (a dot matches a dot, too)


@dataclass
class ConversionRules:
    """What this module understands of a model type's checkpoint conversion mapping.

    Attributes:
        renamings: ``(checkpoint text, model text)`` pairs of plain-string renamings.
        stackings: ``(model suffix, [source patterns with "*" for the expert])`` of supported converters.
    """

    renamings: list[tuple[str, str]] = field(default_factory=list)
    stackings: list[tuple[str, list[str]]] = field(default_factory=list)

    @classmethod
    def for_model_type(cls, model_type: str | None) -> ConversionRules:
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        except ImportError:
            return cls()
        rules = cls()
        stackable = ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])
        for item in (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []:
            sources, targets = list(item.source_patterns), list(item.target_patterns)
            ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(item, "operations", [])]
            plain = all(_PLAIN.match(p) for p in sources + targets)
            if not ops and len(sources) == len(targets) == 1 and plain:
                rules.renamings.append((sources[0], targets[0]))
            elif len(targets) == 1 and all("*" in s for s in sources) and ops in stackable:
                rules.stackings.append((targets[0], sources))
        return rules

    def variants(self, names: list[str], prefix: str = "") -> list[list[str]]:
        """``names`` as the model says them, then as a checkpoint may: before each renaming, and without
        the model's ``prefix`` (``"model"``), the same change applied to every name at once."""
        out = [list(names)]
        for before, after in self.renamings:
            out += [[n.replace(after, before) for n in v] for v in out if any(after in n for n in v)]
        if prefix:
            head = prefix + "."
            out += [[n.removeprefix(head) for n in v] for v in out if all(n.startswith(head) for n in v)]
        return out

    def expert_sources(self, param: str, expert: int, prefix: str = "") -> list[list[str]]:
        """Candidate name lists whose concatenation along dimension 0 is ``param[expert]``."""
        for target, sources in self.stackings:
            bare = target.lstrip(".")
            if param == bare or param.endswith("." + bare):
                stem = param[: len(param) - len(bare)]  # ends with "." unless empty
                if target.startswith("."):
                    stem = stem[:-1]
                return self.variants([stem + s.replace("*", str(expert)) for s in sources], prefix)
        return []


class StackedFromExperts(TensorSource):
    """Stacked parameters assembled from per-expert checkpoint tensors (only ever one slice at a time).

    Args:
        checkpoint (`TensorSource`): the checkpoint (names as stored).
    """

    def __init__(self, checkpoint: TensorSource) -> None:
        self.checkpoint = checkpoint
        self.parts: dict[str, list[list[str]]] = {}  # param -> per expert, the source names
        self.meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def add(self, param: str, rules: ConversionRules, shape: tuple[int, ...], prefix: str = "") -> str | None:
        """Bind stacked ``param`` of ``shape``; returns a mismatch line, or None when every part is found."""
        per_expert = []
        for e in range(shape[0]):
            candidates = rules.expert_sources(param, e, prefix)
            found = next((c for c in candidates if all(n in self.checkpoint for n in c)), None)
            if found is None:
                tried = ", ".join(candidates[0]) if candidates else "no conversion rule for it"
                return f"{param}: missing from the checkpoint, and so is expert {e}'s part ({tried})"
            per_expert.append(found)
        dtypes_shapes = [self.checkpoint.dtype_shape(n) for n in per_expert[0]]
        rows = sum(s[0] for _, s in dtypes_shapes)
        got = (shape[0], rows, *dtypes_shapes[0][1][1:])
        if got != tuple(shape) or len({d for d, _ in dtypes_shapes}) != 1:
            return f"{param}: per-expert tensors {per_expert[0]} stack to {got}, model expects {tuple(shape)}"
        self.parts[param] = per_expert
        self.meta[param] = (dtypes_shapes[0][0], tuple(shape))
        return None

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.meta[name]

    def fill_slice(self, name: str, index: int, dest: torch.Tensor) -> None:
        row = 0
        for key in self.parts[name][index]:
            rows = self.checkpoint.dtype_shape(key)[1][0]
            self.checkpoint.fill(key, dest[row : row + rows])
            row += rows

    def fill(self, name: str, dest: torch.Tensor) -> None:
        for e in range(dest.shape[0]):
            self.fill_slice(name, e, dest[e])
