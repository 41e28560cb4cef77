"""The LoRE-Adapter's `target_parameters` part: experts and other non-Linear weights (routers).

PEFT can wrap only nn.Linear / nn.Embedding modules by `target_modules`; fused experts
(3-D parameters) and router weights of custom modules (MixtralTopKRouter, GptOssTopKRouter …)
it wraps by `target_parameters` (ParamWrapper). Their LoRE is computed here per in-memory
parameter, a chunk of experts at a time (`moe_lore.lowrank_experts`), from the checkpoint
tensors that make it up (`naming.NameMap`), and written as ParamWrapper factors: one rank per
parameter, each expert zero-padded to it. Other tensors of a wrapped module (gpt-oss expert
biases, DeepSeek's router correction bias) go in as `bias="all"` entries under the wrapper's
`base_layer` path, where PEFT's loader finds them.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from ..arch.naming import NameMap, ParamInfo, Piece
from ..arch.table import Reach, Role, RoleTable
from ..engine.streaming import check_finite
from ..io.safetensors_reader import CheckpointError
from ..optional import missing
from ..peft_format.format import PREFIX, outermost_modules
from .moe_lore import ExpertOptions, lowrank_experts, pack_for_peft
from .target import RankTarget

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ParamTarget:
    """One in-memory parameter written as a ParamWrapper LoRA."""

    info: ParamInfo
    pieces: tuple[Piece, ...]  # its checkpoint tensors (one, when stored as in memory)
    depth: int  # `.base_layer` levels above the wrapper that holds it

    @property
    def owner(self) -> str:
        return self.info.name.rpartition(".")[0]

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.owner}" + ".base_layer" * self.depth

    @property
    def experts(self) -> int:
        return self.info.shape[0] if len(self.info.shape) == 3 else 1


@dataclass
class ParamPlan:
    """The LoRE targets once parameter targets are taken out."""

    targets: list  # lore.Target: what PEFT wraps by module (or saves / biases)
    params: list[ParamTarget]
    wrappers: dict[str, int]  # module -> ParamWrappers stacked on it
    wholes: set[str]  # modules saved whole (modules_to_save), children included


def plan_param_targets(targets: list, table: RoleTable, base) -> ParamPlan:
    """The parameter targets of `targets` over checkpoint `base`. A model with none to find (see
    `may_have_param_targets`) skips the search: no NameMap (a second meta build) and no PEFT
    import, ~10 s of a dense 1B LoRE on 2 cores (measured)."""
    if not may_have_param_targets(targets, table):
        return dense_plan(targets)
    if table.transformers_missing:  # names only: fine for a dense model, never a guess at experts
        _refuse_experts_by_name(targets)
        return dense_plan(targets)
    return split_param_targets(targets, NameMap.from_checkpoint(base))


# Names of mixture-of-experts tensors (experts, shared experts, routers) in the common families.
_MOE_NAME = re.compile(r"\.(experts|shared_experts?|block_sparse_moe|router)\.|\.gate\.weight$")


def _refuse_experts_by_name(targets: list) -> None:
    """Without transformers there are no classes to say how PEFT reaches experts and routers:
    a checkpoint that has them (by name, or any 3-D tensor) needs the `hf` extra."""
    for t in targets:
        if _MOE_NAME.search(t.pair.name) or len(t.pair.shape) > 2:
            raise missing("transformers", f"LoRE-Adapt of {t.pair.name} (a mixture-of-experts tensor)")


def may_have_param_targets(targets: list, table: RoleTable) -> bool:
    """Whether any target may need PEFT target_parameters: experts (fused or per expert), or a
    low-rank candidate no layer class claims (role `other`: a router's bare matrix). A dense
    model's table, derived from its classes, rules both out; a name-only table rules out nothing."""
    if not table.derived or any(r.role is Role.EXPERTS for r in table.roles.values()):
        return True
    return any(t.role == "lora" and t.pair.kind in (Role.EXPERTS, Role.OTHER) for t in targets)


def dense_plan(targets: list) -> ParamPlan:
    """`split_param_targets` where no target is a parameter target."""
    targets, wholes = _whole_modules(targets)
    return ParamPlan(targets, [], {}, wholes)


def split_param_targets(targets: list, names: NameMap) -> ParamPlan:
    """Take experts and non-Linear weights out of `targets` as parameter targets."""
    targets, wholes = _whole_modules(targets)
    chosen: dict[str, list[Piece]] = {}
    for t in targets:
        piece = names.pieces.get(t.pair.name)
        if piece is not None and _by_parameter(piece, names.params.get(piece.param), t):
            chosen.setdefault(piece.param, []).append(piece)
    owners: dict[str, list[str]] = {}
    for param in names.params:  # model order: the first parameter is the innermost wrapper
        if param in chosen:
            owners.setdefault(param.rpartition(".")[0], []).append(param)
    ptargets = []
    for owner, params in owners.items():
        for i, param in enumerate(params):
            pieces = tuple(sorted(chosen[param], key=lambda p: (p.expert or 0, p.row0)))
            ptargets.append(ParamTarget(names.params[param], pieces, len(params) - 1 - i))
    taken = {p.key for pt in ptargets for p in pt.pieces}
    wrappers = {o: len(p) for o, p in owners.items()}
    rest = [_as_bias(t, wrappers, names) for t in targets if t.pair.name not in taken]
    return ParamPlan(rest, ptargets, wrappers, wholes)


def _whole_modules(targets: list) -> tuple[list, set[str]]:
    """A module with a full tensor of its own and LoRA children (gpt-oss attention `sinks`):
    PEFT saves it only whole (modules_to_save), children as full tensors of Θ."""
    lora = {t.module for t in targets if t.role in ("lora", "embedding")}
    wholes = {t.module for t in targets if t.role == "full" and any(m.startswith(t.module + ".") for m in lora)}
    inside = lambda m: any(m == w or m.startswith(w + ".") for w in wholes)
    out = [type(t)(t.pair, "full", t.source, key=PREFIX + t.pair.param) if inside(t.module) else t for t in targets]
    if wholes:
        logger.warning("saved whole (PEFT cannot adapt their children and keep their own tensors): %s",
                       ", ".join(sorted(wholes)))
    return out, wholes


def _by_parameter(piece: Piece, info: ParamInfo | None, t) -> bool:
    """Whether target `t` goes in as a ParamWrapper: the table says PEFT reaches its parameter only
    by target_parameters; an expert or a Linear leaf PEFT remaps goes there whatever its LoRE role,
    a bare matrix only when it is low-rank."""
    reach = t.pair.role.reach if t.pair.role is not None else Reach.SAVED
    if info is None or t.role == "bias" or reach is not Reach.PARAMETER:
        return False
    if piece.expert is not None or len(info.shape) == 3 or t.pair.kind in (Role.LINEAR, Role.CONV1D):
        return True
    return t.role == "lora"


def _as_bias(t, wrappers: dict[str, int], names: NameMap):
    """A full tensor of a wrapped module cannot be a modules_to_save (PEFT refuses to wrap a
    ParamWrapper); PEFT's bias="all" saves and loads any parameter named like a bias, at the
    path it has under the wrappers."""
    module, _, leaf = names.param_of(t.pair.name).rpartition(".")
    if module not in wrappers:
        return t
    if "bias" not in leaf:
        raise CheckpointError(f"{t.pair.name}: a full tensor of a module adapted by target_parameters cannot be "
                              "saved in a PEFT adapter; leave it out with --exclude")
    key = f"{PREFIX}{module}" + ".base_layer" * wrappers[module] + f".{leaf}"
    return type(t)(t.pair, "bias", t.source, key=key)


def param_keys(ptargets: list[ParamTarget]) -> list[str]:
    return [f"{pt.key}.lora_{x}.weight" for pt in ptargets for x in ("A", "B")]


def options_from(target: RankTarget, seed: int) -> ExpertOptions:
    """The per-expert targets of a LoRE run (an error target is an energy target)."""
    energy = target.energy_share
    if target.max_error is not None:
        energy = min(1.0, max(1e-12, energy))
    return ExpertOptions(energy=energy, rank=target.rank, max_rank=target.max_rank, seed=seed)


def add_target_parameters(config: dict, plan: ParamPlan, modules: dict) -> None:
    """Add the parameter targets to an adapter config, each rank by pattern (alpha = rank: scaling 1),
    and save modules whole where needed (only the outermost: a saved module holds its children)."""
    if plan.wholes:
        config["modules_to_save"] = sorted(set(config["modules_to_save"] or []) | plan.wholes)
    config["modules_to_save"] = outermost_modules(config["modules_to_save"])
    if plan.params:
        config["target_parameters"] = [pt.info.name for pt in plan.params]
    for pt in plan.params:
        rank = modules[pt.info.name]["rank"]
        config["rank_pattern"][pt.info.name] = rank
        config["alpha_pattern"][pt.info.name] = rank


def param_target_factors(pt: ParamTarget, phi, theta, dtype, dev, options: ExpertOptions,
                         chunk: int) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    """One parameter's per-expert LoRE, packed as PEFT's ParamWrapper factors (key, tensor) in
    `dtype`, and its manifest record."""
    factors, base_sq = _factors(pt, phi, theta, dev, options, chunk)
    pack = pack_for_peft(factors, transposed=pt.info.transposed)
    tensors = []
    for part, tensor in (("A", pack.A), ("B", pack.B)):
        tensor = tensor.to(dtype)
        check_finite(tensor, pt.info.name)
        tensors.append((f"{pt.key}.lora_{part}.weight", tensor))
    logger.info("%s: ranks %d-%d over %d experts, padded to %d (%.0f%% padding)", pt.info.name,
                min(pack.ranks), max(pack.ranks), len(pack.ranks), pack.rank, 100 * pack.padding)
    return tensors, _record(pt, factors, pack, math.sqrt(base_sq))


def _record(pt: ParamTarget, factors, pack, base_norm: float) -> dict:
    total = sum(f.total_energy for f in factors)
    captured = sum(f.captured for f in factors)
    return {
        "kind": "experts" if pt.experts > 1 else "parameter", "shape": list(pt.info.shape),
        "rank": pack.rank, "expert_ranks": pack.ranks, "padding": round(pack.padding, 6),
        "energy": round(captured / total, 6) if total else 1.0,
        "rel_error": round(math.sqrt(max(0.0, 1 - captured / total)), 6) if total else 0.0,
        "rel_error_max": round(max(f.rel_error for f in factors), 6), "base_norm": base_norm,
    }


def _factors(pt: ParamTarget, phi, theta, dev, options, chunk):
    """Δ a chunk of experts at a time (never the whole parameter), decomposed as it comes."""
    base_sq = [0.0]

    def chunks():
        for start in range(0, pt.experts, chunk):
            theta_c, phi_c = _read_experts(pt, theta, start, chunk, dev), _read_experts(pt, phi, start, chunk, dev)
            base_sq[0] += float(phi_c.double().square().sum())
            delta = theta_c.sub_(phi_c)
            check_finite(delta, pt.info.name)
            yield delta

    factors = lowrank_experts(chunks(), options)
    return factors, base_sq[0]


def _read_experts(pt: ParamTarget, ckpt, start: int, chunk: int, dev) -> torch.Tensor:
    """Experts [start, start + chunk) as float32 [c, rows, cols] on the device, in the stored layout."""
    stop = min(pt.experts, start + chunk)
    if pt.pieces[0].expert is None:  # stored as in memory: rows of the checkpoint tensor are experts
        block = ckpt.read_rows(pt.pieces[0].key, start, stop) if pt.experts > 1 else ckpt.read(pt.pieces[0].key)[None]
        return block.to(dev, torch.float32)
    experts = []
    for e in range(start, stop):
        parts = [ckpt.read(p.key).to(dev, torch.float32) for p in pt.pieces if p.expert == e]
        experts.append(torch.cat(parts))
    return torch.stack(experts)
