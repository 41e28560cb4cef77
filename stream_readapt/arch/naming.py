"""Checkpoint keys <-> in-memory parameter names, as transformers converts them at load.

transformers 5 renames some checkpoint keys and fuses others when it loads a model: Mixtral's
`model.layers.0.block_sparse_moe.experts.3.w1.weight` [I, H] (and `w3`) becomes rows of
expert 3 in `model.layers.0.mlp.experts.gate_up_proj` [E, 2I, H]. PEFT adapters are keyed by
the in-memory names, checkpoints by the on-disk ones. `NameMap` says, for every checkpoint
key, which parameter it lands in and where (expert, first row), and back.

The rules are transformers' own (`get_model_conversion_mapping` on a model built on the meta
device, so nothing is allocated); only the operations that fuse experts are interpreted here
(`MergeModulelist(dim=0)`, optionally followed by `Concatenate(dim=1)`), anything else is
refused with its name rather than guessed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from ..io.safetensors_reader import CheckpointError
from ..optional import require
from .meta import meta_build

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """Where one checkpoint tensor lives in the model: `param[expert][row0 : row0 + rows]`,
    or the whole parameter when `expert` is None."""

    key: str
    param: str
    expert: int | None = None
    row0: int = 0
    rows: int = 0


@dataclass(frozen=True)
class ParamInfo:
    """An in-memory parameter: its shape and, for fused experts, PEFT's orientation flag."""

    name: str
    shape: tuple[int, ...]
    transposed: bool = False  # experts stored [E, in, out] (gpt-oss), not [E, out, in]
    linear: bool = True  # owned by an nn.Linear / nn.Embedding (a PEFT target_modules target)


@dataclass
class NameMap:
    """Both directions between checkpoint keys and model parameter names.

    Example:
        >>> names = NameMap.from_checkpoint(ckpt)
        >>> names.pieces["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
        Piece(key=..., param='model.layers.0.mlp.experts.gate_up_proj', expert=3, row0=0, rows=40)
    """

    pieces: dict[str, Piece] = field(default_factory=dict)  # checkpoint key -> piece
    params: dict[str, ParamInfo] = field(default_factory=dict)  # every in-memory parameter, in model order
    model_type: str | None = None

    def param_of(self, key: str) -> str:
        piece = self.pieces.get(key)
        return piece.param if piece is not None else key

    def keys_of(self, param: str) -> list[Piece]:
        """The checkpoint tensors that make up `param` (expert order, then row order)."""
        found = [p for p in self.pieces.values() if p.param == param]
        return sorted(found, key=lambda p: (p.expert if p.expert is not None else -1, p.row0))

    @property
    def fused(self) -> set[str]:
        return {p.param for p in self.pieces.values() if p.expert is not None}

    @classmethod
    def from_checkpoint(cls, ckpt) -> "NameMap":
        """The map for a `Checkpoint` (its config.json picks the architecture)."""
        build = meta_model(ckpt.config, ckpt.source)
        model, transforms = build if build is not None else (None, [])
        names = cls(params=model_params(model), model_type=ckpt.config.get("model_type"))
        if model is None:
            return names
        renamings, converters = _split(transforms)
        for key in ckpt.names:
            names.pieces[key] = _place(key, renamings, converters, ckpt)
        _add_row_offsets(names, ckpt)
        _check_complete(names, ckpt.source)
        return names


def meta_model(config: dict, source: str = "config.json"):
    """(model, conversion mapping) of `config` from the one meta-device build; None if unknown."""
    if not config.get("model_type"):
        return None
    require("transformers", "placing checkpoint keys in transformers' parameters (experts, target_parameters)")
    try:
        return meta_build(config)
    except (ValueError, KeyError, TypeError, ImportError) as e:  # unknown or custom-code architecture
        logger.warning("%s: transformers cannot build model_type %r (%s): names taken as they are",
                       source, config.get("model_type"), e)
        return None


def model_params(model) -> dict[str, ParamInfo]:
    import torch

    if model is None:
        return {}
    modules = dict(model.named_modules())
    params = {}
    for name, tensor in model.state_dict().items():
        owner = modules.get(name.rsplit(".", 1)[0])
        linear = isinstance(owner, (torch.nn.Linear, torch.nn.Embedding))
        params[name] = ParamInfo(name, tuple(tensor.shape), bool(getattr(owner, "is_transposed", False)), linear)
    return params


def _split(transforms):
    """transformers' renamings and converters, apart (the build computed the mapping once)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _place(key: str, renamings, converters, ckpt) -> Piece:
    from transformers.core_model_loading import rename_source_key

    param, pattern = rename_source_key(key, renamings, converters)
    if pattern is None:
        return Piece(key, param)
    converter = next(c for c in converters if pattern in c.source_patterns)
    _check_operations(converter, key, ckpt.source)
    expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if expert is None:
        raise CheckpointError(f"{ckpt.source}: tensor {key!r}: no expert index where {pattern!r} has '*'")
    part = converter.source_patterns.index(pattern)
    # row0 holds the part index until every key is known (see _add_row_offsets)
    return Piece(key, param, int(expert.group(1)), part, ckpt.info(key).shape[0])


def _check_operations(converter, key: str, source: str) -> None:
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(converter, "operations", []))
    ok = (len(ops) in (1, 2) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
          and (len(ops) == 1 or (isinstance(ops[1], Concatenate) and ops[1].dim == 1)))
    if not ok:
        raise CheckpointError(
            f"{source}: tensor {key!r} is converted at load by {[type(o).__name__ for o in ops]}, which stream-readapt "
            "does not map yet (only stacked experts, optionally concatenated along rows)"
        )


def _add_row_offsets(names: NameMap, ckpt) -> None:
    """Concatenated parts (gate, then up) follow each other along an expert's rows."""
    rows: dict[tuple[str, int, int], int] = {}
    for p in names.pieces.values():
        if p.expert is not None:
            rows[(p.param, p.expert, p.row0)] = p.rows
    for key, p in list(names.pieces.items()):
        if p.expert is not None:
            offset = sum(rows[(p.param, p.expert, i)] for i in range(p.row0))
            names.pieces[key] = Piece(key, p.param, p.expert, offset, p.rows)


def _check_complete(names: NameMap, source: str) -> None:
    """Each fused parameter is exactly covered: every expert, every row, the model's shape."""
    for param in names.fused:
        info = names.params.get(param)
        if info is None:
            raise CheckpointError(f"{source}: checkpoint tensors fuse into {param!r}, which the model does not have")
        pieces = names.keys_of(param)
        experts = {p.expert for p in pieces}
        rows = sum(p.rows for p in pieces if p.expert == 0)
        if experts != set(range(info.shape[0])) or rows != info.shape[1]:
            raise CheckpointError(
                f"{source}: {param!r} is {list(info.shape)} in the model but the checkpoint has "
                f"{len(experts)} experts of {rows} rows (missing or extra expert tensors)"
            )
