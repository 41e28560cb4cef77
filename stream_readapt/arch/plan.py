"""Pair the tensors of two checkpoints by name, before any byte is read.

Resolves tied embeddings (a tied model has no `lm_head.weight`: it reads the
embedding) and added vocabulary (an instruct model whose embedding / lm_head has
more rows than the base: the extra rows have no base counterpart), and fails fast
on anything that cannot be paired: other architectures, other shapes, a tensor
present on one side only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..io.checkpoint import Checkpoint
from ..io.safetensors_reader import CheckpointError
from .roles import is_vocab_key, role_table
from .table import VOCAB_ROLES, Role, RoleTable, TensorRole, ties_embeddings  # noqa: F401


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: what it is, what to read (`base` rows [0, base_rows), the other side
    all rows), and its shape. Extract, LoRE, merge and patch_model all work from these."""

    name: str  # checkpoint key of the output tensor
    base: str  # base tensor to read (the embedding, for a tied lm_head)
    shape: tuple[int, ...]  # output shape (the instruct / RE-Adapter side)
    base_rows: int  # rows the base has; rows past it are added vocabulary
    dtype: torch.dtype  # the base's dtype
    role: TensorRole | None = None  # from the architecture's role table

    @property
    def added_rows(self) -> int:
        return (self.shape[0] if self.shape else 1) - self.base_rows

    @property
    def param(self) -> str:
        """The in-memory parameter name (what PEFT adapters and loaded models call it)."""
        return self.role.param if self.role else self.name

    @property
    def kind(self) -> Role:
        return self.role.role if self.role else Role.OTHER


def roles_of(ckpt, extra_keys=()) -> RoleTable:
    """The role table of a checkpoint (or a loaded model seen as one), computed once per object."""
    table = getattr(ckpt, "_role_table", None)
    if table is None or any(k not in table.roles for k in extra_keys):
        table = getattr(ckpt, "role_table", None) or role_table(ckpt.config, list(ckpt.names) + list(extra_keys))
        ckpt._role_table = table
    return table


def base_name_for(base: Checkpoint, name: str) -> str | None:
    """The base tensor that plays `name`'s role: `name` is a checkpoint key or an in-memory
    parameter name (PEFT's); a tied lm_head reads the embedding."""
    if name in base:
        return name
    table = roles_of(base)
    key = table.key_of(name) or name
    if key in base:
        return key
    role = table.of(key)
    if role.role is Role.LM_HEAD and ties_embeddings(base.config):
        embed = role.tied_to or table.embedding_key
        return embed if embed in base else None
    return None


def check_architectures(base: Checkpoint, other: Checkpoint, other_label: str) -> None:
    a, b = base.config, other.config
    for ckpt, config in ((base, a), (other, b)):
        ties_embeddings(config, f"{ckpt.source}/config.json")  # fails fast on a non-bool flag
    for key in ("model_type", "architectures"):
        if a.get(key) and b.get(key) and a[key] != b[key]:
            raise CheckpointError(
                f"{other.source}: {other_label} is {key}={b[key]!r} but the base is {a[key]!r}"
            )


def check_float(dtype: torch.dtype, name: str, source: str) -> None:
    """Readaptation is arithmetic on weights: integer or bool tensors (quantized weights, masks)
    would be cast, blended and written back as nonsense."""
    if not dtype.is_floating_point:
        raise CheckpointError(f"{source}: tensor {name!r} is {str(dtype).replace('torch.', '')}; "
                              "only floating-point tensors can be readapted")


def pair_tensor(base: Checkpoint, name: str, shape: tuple[int, ...], source: str,
                dtype: torch.dtype | None = None) -> TensorPlan:
    """`name` of the other side (its `shape` and `dtype`) paired with its base tensor."""
    role = roles_of(base, (name,)).of(name)
    base_tensor = base_name_for(base, name)
    if base_tensor is None:
        raise CheckpointError(f"{source}: tensor {name!r} has no counterpart in the base {base.source}")
    info = base.info(base_tensor)
    check_float(info.dtype, base_tensor, base.source)
    if dtype is not None:
        check_float(dtype, name, source)
    if info.shape == shape:
        return TensorPlan(name, base_tensor, shape, info.shape[0] if shape else 1, info.dtype, role)
    is_vocab = role.role in VOCAB_ROLES if roles_of(base).derived else is_vocab_key(name)
    grown = (is_vocab and len(shape) == 2 and len(info.shape) == 2
             and shape[1] == info.shape[1] and shape[0] > info.shape[0])
    if not grown:
        raise CheckpointError(
            f"{source}: tensor {name!r} has shape {list(shape)} but the base has {list(info.shape)}"
        )
    return TensorPlan(name, base_tensor, shape, info.shape[0], info.dtype, role)


def plan_pairs(base: Checkpoint, instruct: Checkpoint) -> list[TensorPlan]:
    """Every tensor of the instruct model, paired with the base, in the base's shard order."""
    check_architectures(base, instruct, "the instruct model")
    table = roles_of(base, instruct.names)
    dropped = [n for n in base.names if n not in instruct
               and not (table.of(n).role is Role.LM_HEAD and ties_embeddings(instruct.config))]
    if dropped:
        raise CheckpointError(f"{instruct.source}: tensor {dropped[0]!r} of the base is missing here")
    order = {n: i for i, n in enumerate(base.names)}
    names = sorted(instruct.names, key=lambda n: order.get(n, len(order)))
    return [pair_tensor(base, n, tuple(instruct.info(n).shape), instruct.source, instruct.info(n).dtype) for n in names]


def select(names: list[str], include: list[str] | None, exclude: list[str] | None) -> set[str]:
    """Names matching any `include` regex (all if none) and no `exclude` regex (never none)."""
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    chosen = {
        n for n in names
        if (not inc or any(p.search(n) for p in inc)) and not any(p.search(n) for p in exc)
    }
    if names and not chosen:
        raise ValueError(f"--include/--exclude leave none of the {len(names)} tensors (an empty output would be useless)")
    return chosen


def _patterns(texts: list[str] | None, option: str) -> list[re.Pattern]:
    try:
        return [re.compile(t) for t in texts or []]
    except re.error as e:
        raise ValueError(f"--{option} {e.pattern!r} is not a valid regular expression ({e})") from None


def bind_adapter(adapter, base) -> None:
    """Check a PEFT adapter against `base` and key it by the base's tensor names: PEFT names
    modules as the loaded model does (GPT-NeoX's `lm_head` is `embed_out` on disk), and a
    Conv1D layer's factors apply transposed (PEFT forces fan_in_fan_out there)."""
    table = roles_of(base)
    table.require_classes(f"{adapter.source}: a PEFT adapter", names_suffice=True)
    if adapter.config.get("fan_in_fan_out") and not table.derived:
        raise CheckpointError(f"{adapter.source}: a fan_in_fan_out (Conv1D) adapter needs the model's transformers "
                              f"classes to know which layers are transposed: {table.reason}")
    adapter.check_base(base, resolve=lambda n: base_name_for(base, n),
                       transposed=lambda key: table.of(key).transposed,
                       saved_key=lambda n: n if n in base else (table.key_of(n) or n))
