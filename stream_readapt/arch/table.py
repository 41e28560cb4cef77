"""The per-key table of one architecture: what each checkpoint tensor is, and where it lives.

One row per checkpoint key: its role, the in-memory parameter it loads into (and, for a
per-expert key fused at load, which expert and which of the concatenated parts), whether it is
stored transposed, and how a PEFT LoRA reaches it (`Reach`); one record per in-memory
parameter (shape, orientation, reach). Built by `roles.role_table` (from the transformers
classes, or names alone) and kept between runs by `role_cache`; read by every path (extract,
LoRE, merge, patch_model, the MoE split through its `naming.NameMap` view).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..io.safetensors_reader import CheckpointError


class Role(str, Enum):
    LINEAR = "linear"
    CONV1D = "conv1d"  # GPT-2's Conv1D: y = x·W + b with W stored [in, out]
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    NORM = "norm"
    BIAS = "bias"  # the bias of a linear / Conv1D layer
    EXPERTS = "experts"  # fused expert parameters ([E, ...]) or per-expert keys fused at load
    OTHER = "other"


VOCAB_ROLES = (Role.EMBEDDING, Role.LM_HEAD)


class Reach(str, Enum):
    """How a PEFT LoRA reaches a parameter (what `target_modules` / `target_parameters` can wrap)."""

    MODULE = "module"  # its nn.Linear / Conv1D / nn.Embedding owner, by target_modules
    PARAMETER = "parameter"  # by target_parameters (ParamWrapper): experts, a router's bare matrix
    SAVED = "saved"  # no LoRA reaches it: saved whole (modules_to_save) or as a bias (bias="all")


@dataclass(frozen=True)
class ParamInfo:
    """An in-memory parameter of the architecture: its shape and how PEFT reaches it."""

    name: str
    shape: tuple[int, ...]
    transposed: bool = False  # experts stored [E, in, out] (gpt-oss), not [E, out, in]
    linear: bool = True  # owned by an nn.Linear / nn.Embedding (a PEFT target_modules target)
    reach: Reach = Reach.MODULE


@dataclass(frozen=True)
class TensorRole:
    """One checkpoint tensor: its key, the in-memory parameter it loads into, and what it is."""

    key: str  # checkpoint key (on disk)
    param: str  # parameter name in the loaded transformers model (what PEFT adapters use)
    role: Role
    module_class: str = ""
    embed_scale: float | None = None  # a scaled embedding multiplies its rows by this
    tied_to: str | None = None  # a tied lm_head: the checkpoint key of the embedding it reads
    # A per-expert key fused at load: expert `expert` of `param`, `part`-th of the tensors
    # concatenated along its rows (Mixtral's w1, w3 -> gate_up_proj); `unfusable` names the
    # converter operations when transformers fuses it in a way this tool does not map.
    expert: int | None = None
    part: int = 0
    unfusable: str = ""
    reach: Reach = Reach.SAVED

    @property
    def module(self) -> str:
        """The owning module's in-memory name (PEFT's target / modules_to_save name)."""
        return self.param.rsplit(".", 1)[0]

    @property
    def transposed(self) -> bool:
        return self.role is Role.CONV1D


@dataclass
class RoleTable:
    """Roles of every parameter of one architecture, by checkpoint key and by parameter name."""

    model_type: str
    roles: dict[str, TensorRole] = field(default_factory=dict)  # by checkpoint key
    params: dict[str, ParamInfo] = field(default_factory=dict)  # every in-memory parameter, model order
    derived: bool = True  # False: names only (transformers missing or the model_type unknown)
    reason: str = ""  # why not derived
    unknown: bool = False  # transformers is there but cannot build this model_type: refuse, never guess
    transformers_missing: bool = False  # names only because the `hf` extra is not installed

    def __post_init__(self):
        self._by_param = {r.param: r for r in self.roles.values()}

    def of(self, key: str) -> TensorRole:
        """The role of checkpoint key `key` (OTHER for a key the classes do not know)."""
        return self.roles.get(key) or TensorRole(key, key, Role.OTHER)

    def key_of(self, param: str) -> str | None:
        """The checkpoint key of in-memory parameter `param` (None if the model has no such parameter)."""
        r = self._by_param.get(param)
        return r.key if r else None

    def param_of(self, key: str) -> str:
        return self.of(key).param

    @property
    def lm_head(self) -> TensorRole | None:
        return next((r for r in self.roles.values() if r.role is Role.LM_HEAD), None)

    @property
    def embedding_key(self) -> str | None:
        """The input embedding (what a tied head reads)."""
        head = self.lm_head
        if head is not None and head.tied_to:
            return head.tied_to
        return next((r.key for r in self.roles.values() if r.role is Role.EMBEDDING), None)

    def require_classes(self, what: str, *, names_suffice: bool = False) -> None:
        """Paths that must know layer classes refuse a name-only table; `names_suffice`: a
        name-only table will do when transformers is simply not installed (Llama-like names)."""
        if not self.derived and (self.unknown or not names_suffice):
            raise CheckpointError(f"{what} needs the transformers classes of model_type {self.model_type!r}: {self.reason}")


def ties_embeddings(config: dict, source: str = "config.json") -> bool:
    # transformers' PretrainedConfig defaults tie_word_embeddings to True.
    text = config.get("text_config")
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True) if isinstance(text, dict) else True)
    if not isinstance(tied, bool):  # a string "false" would read as true
        raise CheckpointError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
    return tied
