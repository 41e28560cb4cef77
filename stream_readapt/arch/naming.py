"""Checkpoint keys <-> in-memory parameter names, as transformers converts them at load.

transformers 5 renames some checkpoint keys and fuses others when it loads a model: Mixtral's
`model.layers.0.block_sparse_moe.experts.3.w1.weight` [I, H] (and `w3`) becomes rows of
expert 3 in `model.layers.0.mlp.experts.gate_up_proj` [E, 2I, H]. PEFT adapters are keyed by
the in-memory names, checkpoints by the on-disk ones. `NameMap` says, for every checkpoint
key, which parameter it lands in and where (expert, first row), and back.

This is a view of the architecture's one table (`roles.role_table`: transformers' own
conversion rules, applied on the meta build), plus what only the checkpoint knows: the rows
each per-expert tensor contributes. A key the table marks unfusable (a converter other than
stacking experts, optionally concatenated along rows) is refused here with its operations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..io.safetensors_reader import CheckpointError
from ..optional import missing
from .table import ParamInfo

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
        """The map for a `Checkpoint`, read off its architecture's one table (`plan.roles_of`)."""
        from .plan import roles_of

        table = roles_of(ckpt)
        names = cls(model_type=ckpt.config.get("model_type"))
        if not table.derived:
            if table.transformers_missing:
                raise missing("transformers", "placing checkpoint keys in transformers' parameters "
                                              "(experts, target_parameters)")
            logger.warning("%s: %s: names taken as they are", ckpt.source, table.reason)
            return names
        names.params = dict(table.params)
        for key in ckpt.names:
            role = table.of(key)
            if role.unfusable:
                raise CheckpointError(f"{ckpt.source}: tensor {key!r} {role.unfusable}")
            # row0 holds the part index until every key is known (see _add_row_offsets)
            names.pieces[key] = (Piece(key, role.param) if role.expert is None
                                 else Piece(key, role.param, role.expert, role.part, ckpt.info(key).shape[0]))
        _add_row_offsets(names, ckpt)
        _check_complete(names, ckpt.source)
        return names


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
