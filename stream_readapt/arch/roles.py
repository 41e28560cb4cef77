"""What each tensor of a checkpoint *is*: one table of tensor roles per architecture.

The table is derived from the transformers classes themselves, not from a hand list of names:
the model is built from its config on the meta device (no memory, no weights) and its modules
say what each parameter is: `nn.Linear` → linear (its bias → bias), transformers' `Conv1D` →
conv1d (stored transposed, [in, out]), `nn.Embedding` → embedding (with the scale a scaled
embedding multiplies by, Gemma's √hidden), `get_output_embeddings()` → lm_head (tied or not,
whatever it is called), a `*Norm*` module → norm (Gemma's `1 + w` norms included: Δ is
additive either way), a convolution's weight (state-space blocks' nn.Conv1d) → other,
a 3-D parameter of a fused `*Experts` module → experts (any other → other).

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

from ..optional import install_hint
from . import role_cache
from .meta import config_key, meta_build
from .quirks import plain_linear
from .table import VOCAB_ROLES, ParamInfo, Reach, Role, RoleTable, TensorRole, ties_embeddings  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


# Name-only fallback (no transformers): the embedding and head names of the common families.
_FALLBACK_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
                        "transformer.word_embeddings.weight", "model.decoder.embed_tokens.weight")
_FALLBACK_HEADS = ("lm_head.weight", "embed_out.weight")



# ----------------------------------------------------------------------------- building


def role_table(config: dict, keys: list[str]) -> RoleTable:
    """The role table of a checkpoint with this `config.json` and these tensor keys (from the
    role cache when an earlier run derived it)."""
    config_json = config_key(config)
    cache_key = role_cache.entry_key(config_json, keys)
    cached = role_cache.load(cache_key) if cache_key else None
    if cached is not None:
        return cached
    table = derive(config, keys)
    if cache_key and table.derived:
        role_cache.store(cache_key, table)
    return table


def derive(config: dict, keys: list[str]) -> RoleTable:
    """The table from the transformers classes (built on the meta device), or from names alone."""
    layers = _layer_count(config)
    if layers > MAX_LAYERS:  # a hostile config would have the meta build run for ever
        return _fallback(config, keys, f"config.json asks for {layers} layers (more than {MAX_LAYERS})", unknown=True)
    try:
        model, transforms = meta_build(config)
    except ImportError as e:
        return _fallback(config, keys, f"transformers is not installed ({e}): {install_hint('transformers')}",
                         transformers_missing=True)
    except Exception as e:  # an unknown model_type or a config transformers rejects
        first = (str(e).splitlines() or [""])[0][:160]
        return _fallback(config, keys, f"transformers cannot build it ({type(e).__name__}: {first})", unknown=True)
    return _from_model(model, config.get("model_type") or "?", keys, transforms)


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
    if plain_linear(module):  # a Linear subclass with its own forward (a router) is not a layer PEFT can wrap
        return Role.BIAS if p_name == "bias" else Role.LINEAR
    if "norm" in type(module).__name__.lower() or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return Role.NORM
    if isinstance(module, nn.modules.conv._ConvNd):  # a state-space block's depthwise conv: 3-D, no experts
        return Role.BIAS if p_name == "bias" else Role.OTHER
    if p.dim() == 3 and type(module).__name__.endswith("Experts"):
        # transformers' fused experts modules (MixtralExperts, DeepseekV3Experts, GptOssExperts …);
        # another 3-D parameter (SigLIP's pooling `probe`, a conv kernel) is no stack of matrices
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
    params = _param_infos(model, by_param, model_type)
    roles: dict[str, TensorRole] = {}
    for key in keys:
        param, fused = rename(key)
        info = params.get(param)
        reach = info.reach if info else Reach.SAVED
        if fused is not None:
            expert, part, unfusable = fused
            roles[key] = TensorRole(key, param, Role.EXPERTS, expert=expert, part=part, unfusable=unfusable,
                                    reach=Reach.PARAMETER)
            continue
        r = by_param.get(param)
        roles[key] = (TensorRole(key, param, r.role, r.module_class, r.embed_scale, reach=reach) if r
                      else TensorRole(key, param, Role.OTHER))
    if tied:  # the head reads the embedding (and is absent from a tied checkpoint)
        head_key = _key_for(roles, tied[0]) or tied[0]
        roles[head_key] = TensorRole(head_key, tied[0], Role.LM_HEAD, by_param[tied[0]].module_class,
                                     tied_to=_key_for(roles, tied[1]), reach=params[tied[0]].reach)
    return RoleTable(model_type, roles, params)


def _param_infos(model, by_param: dict[str, TensorRole], model_type: str) -> dict[str, ParamInfo]:
    """Every in-memory parameter (model order) with how a PEFT LoRA reaches it."""
    from torch import nn

    modules = dict(model.named_modules())
    has_experts = any(r.role is Role.EXPERTS for r in by_param.values())
    remapped = peft_remapped_leaves(model_type) if has_experts else set()
    out = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        owner = modules.get(module_name)
        linear = plain_linear(owner) or isinstance(owner, nn.Embedding)
        r = by_param.get(name)
        role = r.role if r else Role.OTHER
        out[name] = ParamInfo(name, tuple(tensor.shape), bool(getattr(owner, "is_transposed", False)), linear,
                              _reach(role, tensor.dim(), linear, module_name.rpartition(".")[2] in remapped))
    return out


def _reach(role: Role, dim: int, linear: bool, remapped: bool) -> Reach:
    """PEFT's rules: target_modules wraps nn.Linear / Conv1D / nn.Embedding owners; anything else
    with a matrix per expert (3-D) or a bare matrix (a router's weight) only target_parameters
    reaches; PEFT's own MoE conversion moves some Linear leaves there too (DeepSeek's expert names)."""
    if dim == 3 and role is Role.EXPERTS:
        return Reach.PARAMETER
    if dim != 2:
        return Reach.SAVED
    if role in (Role.LINEAR, Role.CONV1D) or linear:
        return Reach.PARAMETER if remapped else Reach.MODULE
    return Reach.PARAMETER


def peft_remapped_leaves(model_type: str | None) -> set[str]:
    """Module names PEFT moves from target_modules to target_parameters on MoE models (its
    transformers-v4 -> v5 config conversion): on DeepSeek-V3 a dense `mlp.gate_proj` listed in
    target_modules would be taken for an expert projection and silently left out."""
    try:
        from peft.utils.transformers_weight_conversion import _MOE_TARGET_MODULE_MAPPING
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:  # no peft, or an older one: no conversion, nothing remapped
        return set()
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(model_type or "", model_type)
    return set(_MOE_TARGET_MODULE_MAPPING.get(pattern or "", {}))


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
    """checkpoint key -> (parameter name, None | (expert, part, unfusable) when a converter fuses
    it at load), by transformers' own rules."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str):
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        return name, None if pattern is None else fused_place(key, pattern, converters)

    return rename


def fused_place(key: str, pattern: str, converters) -> tuple[int | None, int, str]:
    """(expert, part, why not) of a key a converter fuses at load: only stacked experts
    (`MergeModulelist(dim=0)`), optionally concatenated along rows (`Concatenate(dim=1)`), are
    mapped; anything else is recorded with its operations, for the paths that need it to refuse."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    converter = next(c for c in converters if pattern in c.source_patterns)
    ops = list(getattr(converter, "operations", []))
    ok = (len(ops) in (1, 2) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
          and (len(ops) == 1 or (isinstance(ops[1], Concatenate) and ops[1].dim == 1)))
    if not ok:
        return None, 0, (f"is converted at load by {[type(o).__name__ for o in ops]}, which stream-readapt does not "
                         "map yet (only stacked experts, optionally concatenated along rows)")
    expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if expert is None:
        return None, 0, f"has no expert index where {pattern!r} has '*'"
    return int(expert.group(1)), converter.source_patterns.index(pattern), ""


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
    if "lm_head.weight" not in keys and ties_embeddings(config):
        embed = next((k for k in _FALLBACK_EMBEDDINGS if k in keys), None)
        if embed:
            roles["lm_head.weight"] = TensorRole("lm_head.weight", "lm_head.weight", Role.LM_HEAD, tied_to=embed)
    logger.debug("role table for %s from names only: %s", model_type, reason)
    return RoleTable(model_type, roles, derived=False, reason=reason, unknown=unknown,
                     transformers_missing=transformers_missing)


def is_vocab_key(key: str) -> bool:
    """Name-only test for a vocabulary tensor (used where no table is at hand)."""
    return bool(re.search(r"(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings)\.weight$", key))
