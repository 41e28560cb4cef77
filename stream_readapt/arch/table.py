"""The per-key table of one architecture: what each checkpoint tensor is, and where it lives.

Built by `roles.role_table` (from the transformers classes, or names alone) and kept between
runs by `role_cache`; read by every path (extract, LoRE, merge, patch_model, the MoE split).
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
@dataclass(frozen=True)
class TensorRole:
    """One parameter: its checkpoint key, its in-memory name, and what it is."""

    key: str  # checkpoint key (on disk)
    param: str  # parameter name in the loaded transformers model (what PEFT adapters use)
    role: Role
    module_class: str = ""
    embed_scale: float | None = None  # a scaled embedding multiplies its rows by this
    tied_to: str | None = None  # a tied lm_head: the checkpoint key of the embedding it reads

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
