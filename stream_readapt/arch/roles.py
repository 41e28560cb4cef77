"""What each tensor of a checkpoint *is*: one table of tensor roles per architecture.

The table is derived from the transformers classes themselves, not from a hand list of names:
the model is built from its config on the meta device (no memory, no weights) and its modules
say what each parameter is: `nn.Linear` → linear (its bias → bias), transformers' `Conv1D` →
conv1d (stored transposed, [in, out]), `nn.Embedding` → embedding (with the scale a scaled
embedding multiplies by, Gemma's √hidden), `get_output_embeddings()` → lm_head (tied or not,
whatever it is called), a `*Norm*` module → norm (Gemma's `1 + w` norms included: Δ is
additive either way), 3-D expert parameters → experts.

It also maps checkpoint keys (on disk) to parameter names (in memory): transformers 5
renames some at load (GPT-NeoX's `embed_out` is `lm_head` in memory), and PEFT adapters use
the in-memory names. The renamings are transformers' own (`conversion_mapping`), applied,
never copied. Keys that a transformers *converter* (not a plain renaming) rewrites, such as
per-expert tensors fused at load, get role `experts`.

Without transformers (it is an optional extra) the table falls back to names alone
(`derived=False`): enough for elementwise merges, refused by the paths that need classes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import Enum

from ..io.safetensors_reader import CheckpointError
from ..optional import install_hint
from .meta import config_key, meta_build

logger = logging.getLogger(__name__)


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
# Name-only fallback (no transformers): the embedding and head names of the common families.
_FALLBACK_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
                        "transformer.word_embeddings.weight", "model.decoder.embed_tokens.weight")
_FALLBACK_HEADS = ("lm_head.weight", "embed_out.weight")


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


# ----------------------------------------------------------------------------- building


def role_table(config: dict, keys: list[str]) -> RoleTable:
    """The role table of a checkpoint with this `config.json` and these tensor keys."""
    model_type = config.get("model_type") or "?"
    layers = _layer_count(config)
    if layers > MAX_LAYERS:  # a hostile config would have the meta build run for ever
        return _fallback(config, keys, f"config.json asks for {layers} layers (more than {MAX_LAYERS})", unknown=True)
    from . import role_cache  # imported here: role_cache builds on this module

    cache_key = role_cache.entry_key(config_key(config), keys)
    cached = role_cache.load(cache_key) if cache_key else None
    if cached is not None:
        return cached
    try:
        model, transforms = meta_build(config)
    except ImportError as e:
        return _fallback(config, keys, f"transformers is not installed ({e}): {install_hint('transformers')}",
                         transformers_missing=True)
    except Exception as e:  # an unknown model_type or a config transformers rejects
        first = (str(e).splitlines() or [""])[0][:160]
        return _fallback(config, keys, f"transformers cannot build it ({type(e).__name__}: {first})", unknown=True)
    table = _from_model(model, model_type, keys, transforms)
    if cache_key:
        role_cache.store(cache_key, table)
    return table


MAX_LAYERS = 1024  # the deepest published decoders have ~130


def _layer_count(config: dict) -> int:
    sections = [config] + [v for v in config.values() if isinstance(v, dict)]  # text_config of multimodal wrappers
    counts = [s.get(k) for s in sections for k in ("num_hidden_layers", "n_layer", "num_layers")]
    return max([c for c in counts if isinstance(c, int) and not isinstance(c, bool)], default=0)


def table_of_model(model, keys: list[str] | None = None) -> RoleTable:
    """The role table of a loaded transformers model (keys: its checkpoint keys, if known)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    transforms = get_model_conversion_mapping(model, add_legacy=False)
    model_type = getattr(model.config, "model_type", "?")
    if keys is None:
        keys = _reverse_names(model, transforms)
    return _from_model(model, model_type, keys, transforms)


def _module_roles(model) -> dict[str, TensorRole]:
    """Roles by in-memory parameter name, from the module classes (keys filled in later)."""

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every transformers >= 4.0 has it
        Conv1D = ()
    head = model.get_output_embeddings()
    out = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            out[name] = TensorRole(name, name, _role_of(module, p_name, p, head, Conv1D), type(module).__name__,
                                   embed_scale=_embed_scale(module))
    return out


def _role_of(module, p_name: str, p, head, conv1d) -> Role:
    from torch import nn

    if module is head and p_name == "weight":
        return Role.LM_HEAD
    if isinstance(module, nn.Embedding):
        return Role.EMBEDDING
    if isinstance(module, conv1d):
        return Role.BIAS if p_name == "bias" else Role.CONV1D
    if isinstance(module, nn.Linear):
        return Role.BIAS if p_name == "bias" else Role.LINEAR
    if "norm" in type(module).__name__.lower() or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return Role.NORM
    if p.dim() == 3:
        return Role.EXPERTS
    return Role.OTHER


def _embed_scale(module) -> float | None:
    scale = getattr(module, "scalar_embed_scale", None)  # Gemma-style scaled embeddings keep the float
    if scale is None and hasattr(module, "embed_scale"):
        value = module.embed_scale
        scale = float(value) if isinstance(value, (int, float)) else None
    return None if scale is None or scale == 1.0 else float(scale)


def _from_model(model, model_type: str, keys: list[str], transforms) -> RoleTable:
    by_param = _module_roles(model)
    tied = _tied_head(model, by_param)
    rename = _renamer(model, transforms)
    roles: dict[str, TensorRole] = {}
    for key in keys:
        param, converted = rename(key)
        if converted:
            roles[key] = TensorRole(key, param, Role.EXPERTS)
            continue
        r = by_param.get(param)
        roles[key] = TensorRole(key, param, r.role, r.module_class, r.embed_scale) if r else TensorRole(key, param, Role.OTHER)
    if tied:  # the head reads the embedding (and is absent from a tied checkpoint)
        head_key = _key_for(roles, tied[0]) or tied[0]
        roles[head_key] = TensorRole(head_key, tied[0], Role.LM_HEAD, by_param[tied[0]].module_class,
                                     tied_to=_key_for(roles, tied[1]))
    return RoleTable(model_type, roles)


def _tied_head(model, by_param) -> tuple[str, str] | None:
    """(head parameter, embedding parameter) when the head shares the embedding's weight."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or getattr(head, "weight", None) is not getattr(emb, "weight", None):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return f"{names[id(head)]}.weight", f"{names[id(emb)]}.weight"


def _key_for(roles: dict[str, TensorRole], param: str) -> str | None:
    return next((r.key for r in roles.values() if r.param == param), None)


def _renamer(model, transforms):
    """checkpoint key -> (parameter name, whether a converter rewrites it), transformers' own rules."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> tuple[str, bool]:
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        return name, pattern is not None

    return rename


def _reverse_names(model, transforms) -> list[str]:
    """The checkpoint keys `save_pretrained` would write (transformers reverts its renamings on save)."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: torch.empty(0, device="meta") for k in model.state_dict()}
    try:
        return list(revert_weight_conversion(model, state))
    except Exception:  # converters need real shapes: fall back to the in-memory names
        return list(state)


def _fallback(config: dict, keys: list[str], reason: str, *, unknown: bool = False,
              transformers_missing: bool = False) -> RoleTable:
    """Roles from names alone: vocabulary tensors by their usual names, biases by suffix."""
    model_type = config.get("model_type") or "?"
    roles = {}
    for key in keys:
        if key in _FALLBACK_EMBEDDINGS:
            role = Role.EMBEDDING
        elif key in _FALLBACK_HEADS:
            role = Role.LM_HEAD
        elif key.endswith(".bias"):
            role = Role.BIAS
        else:  # names alone: a matrix is taken for a linear layer, a vector for a norm (Llama-like)
            role = Role.OTHER
        roles[key] = TensorRole(key, key, role)
    if "lm_head.weight" not in keys and config.get("tie_word_embeddings", True):
        embed = next((k for k in _FALLBACK_EMBEDDINGS if k in keys), None)
        if embed:
            roles["lm_head.weight"] = TensorRole("lm_head.weight", "lm_head.weight", Role.LM_HEAD, tied_to=embed)
    logger.debug("role table for %s from names only: %s", model_type, reason)
    return RoleTable(model_type, roles, derived=False, reason=reason, unknown=unknown,
                     transformers_missing=transformers_missing)


def is_vocab_key(key: str) -> bool:
    """Name-only test for a vocabulary tensor (used where no table is at hand)."""
    return bool(re.search(r"(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings)\.weight$", key))
