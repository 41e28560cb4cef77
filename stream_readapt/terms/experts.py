"""PEFT `target_parameters` LoRAs (ParamWrapper) on fused expert tensors, as weight deltas.

PEFT wraps a 3-D parameter [E, d1, d2] with lora_A [r·E, in] and lora_B [out, r·E]; expert e
uses rows e·r … e·r + r of A and the columns e, e + E, e + 2E, … of B (PEFT reshapes B to
[out, r, E]). Its delta is s·B_e·A_e, laid out [out, in] (Mixtral-style [E, out, in]
experts) or transposed to [in, out] when the experts module sets `is_transposed` (gpt-oss).
Several parameters of one module nest: the first parameter of the module (in model order)
is the innermost wrapper, saved under `<module>.base_layer.lora_A.weight`, the next one
under `<module>.lora_A.weight`.

Checkpoints may store the experts one tensor per expert (`naming.NameMap` says where each
lands), so Ψ is produced for the rows of one checkpoint tensor at a time: a row block of one
expert's matrix, or a block of whole experts for a tensor stored fused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..arch.naming import NameMap
from ..io.safetensors_reader import CheckpointError
from ..peft_format.format import lora_scaling
from ..peft_format.targets import adapts_module

_WRAPPED = re.compile(r"(\.base_layer)+$")


@dataclass
class ParamLora:
    """One wrapped parameter: its factors and, once bound to a base, where it applies."""

    module: str  # adapter module path, `.base_layer` nesting included
    A: str
    B: str
    param: str = ""
    experts: int = 1
    rank: int = 0
    scale: float = 1.0
    transposed: bool = False

    @property
    def owner(self) -> str:
        return _WRAPPED.sub("", self.module)

    @property
    def depth(self) -> int:
        return self.module[len(self.owner):].count(".base_layer")


def take_param_loras(config: dict, modules: dict) -> dict[str, ParamLora]:
    """Remove from `modules` (name -> LoraModule) the wrappers of `target_parameters`.

    PEFT matches a target parameter name against `<module>.<parameter>` by suffix: a dotted name
    (`mlp.experts.gate_up_proj`) names its owner module; a bare one (`gate_up_proj`, as PEFT's own
    "all-linear" writes on fused-experts models) matches that parameter in any module, so every
    module the config does not adapt by `target_modules` may be its wrapper (`_bind` checks that
    the base has such a parameter there)."""
    targets = config.get("target_parameters") or []
    owners = [t.rpartition(".")[0] for t in targets if "." in t]
    bare = any("." not in t for t in targets)
    found = {}
    for name, mod in list(modules.items()):
        owner = _WRAPPED.sub("", name)
        named = any(owner == o or owner.endswith("." + o) for o in owners)
        if (named or (bare and not adapts_module(config, owner))) and not mod.embedding:
            found[name] = ParamLora(name, mod.A, mod.B)
            del modules[name]
    return found


class ExpertLoras:
    """The `target_parameters` LoRAs of an adapter, bound to a base checkpoint's names."""

    def __init__(self, loras: dict[str, ParamLora], names: NameMap, adapter):
        self.names = names
        self._read = lambda key, device: adapter.ckpt.read(key).to(device, torch.float32)
        self.by_param: dict[str, ParamLora] = {}
        for lora in loras.values():
            _bind(lora, names, adapter)
            self.by_param[lora.param] = lora
        self._cache: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def has(self, key: str) -> bool:
        return self.names.param_of(key) in self.by_param

    def rows(self, key: str, start: int, stop: int, device) -> torch.Tensor:
        """Ψ for rows [start, stop) of checkpoint tensor `key`, float32 on `device`."""
        piece = self.names.pieces.get(key)
        lora = self.by_param[self.names.param_of(key)]
        A, B = self._factors(lora, device)
        if piece is not None and piece.expert is not None:  # one expert's matrix on disk
            if lora.transposed:
                raise CheckpointError(f"{key}: per-expert tensors of transposed experts are not supported")
            a, b = _expert(A, B, lora, piece.expert)
            return (b[piece.row0 + start:piece.row0 + stop] @ a).mul_(lora.scale)
        if lora.experts == 1 and len(self.names.params[lora.param].shape) == 2:
            return (B[start:stop] @ A).mul_(lora.scale)
        out = [self._expert_delta(A, B, lora, e) for e in range(start, stop)]
        return torch.stack(out)

    @staticmethod
    def _expert_delta(A, B, lora: ParamLora, e: int) -> torch.Tensor:
        a, b = _expert(A, B, lora, e)
        delta = (b @ a).mul_(lora.scale)
        return delta.T if lora.transposed else delta

    def _factors(self, lora: ParamLora, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != lora.param:
            self._cache = (lora.param, self._read(lora.A, device), self._read(lora.B, device))
        return self._cache[1], self._cache[2]


def _expert(A: torch.Tensor, B: torch.Tensor, lora: ParamLora, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    r, E = lora.rank, lora.experts
    return A[e * r:(e + 1) * r], B[:, e::E]


def _bind(lora: ParamLora, names: NameMap, adapter) -> None:
    """Which parameter `lora` wraps (nesting depth among the module's targets), its rank and scale."""
    shorts = {t.rpartition(".")[2] for t in adapter.config.get("target_parameters") or []}
    candidates = [p for p in names.params if p.rpartition(".")[0] == lora.owner and p.rpartition(".")[2] in shorts]
    if lora.depth >= len(candidates):
        raise CheckpointError(f"{adapter.source}: {lora.module!r} wraps no parameter of the base "
                              "(adapter made for another base?)")
    lora.param = candidates[len(candidates) - 1 - lora.depth]
    info = names.params[lora.param]
    lora.transposed = info.transposed
    lora.experts, d1, d2 = info.shape if len(info.shape) == 3 else (1, *info.shape)
    fan_in, fan_out = (d1, d2) if lora.transposed else (d2, d1)
    _check_factors(lora, adapter, fan_in, fan_out)


def _check_factors(lora: ParamLora, adapter, fan_in: int, fan_out: int) -> None:
    a, b = adapter.ckpt.info(lora.A).shape, adapter.ckpt.info(lora.B).shape
    r, field = adapter._setting("rank_pattern", "r", lora.param)
    alpha, _ = adapter._setting("alpha_pattern", "lora_alpha", lora.param)
    want_a, want_b = (r * lora.experts, fan_in), (fan_out, r * lora.experts)
    if tuple(a) != want_a or tuple(b) != want_b:
        raise CheckpointError(
            f"{adapter.source}: {lora.param!r}: adapter_config.json {field} = {r} over {lora.experts} experts "
            f"needs lora_A {list(want_a)} and lora_B {list(want_b)}, the file has {list(a)} and {list(b)}"
        )
    lora.rank = r
    lora.scale = lora_scaling(alpha, r, rslora=bool(adapter.config.get("use_rslora")))


def dense_deltas(adapter, device) -> dict[str, torch.Tensor]:
    """Each wrapped parameter's whole Ψ (or Δ, scale included) in its in-memory layout, for
    `patch_model`'s reference path: the parameter is rewritten when the scales change."""
    if adapter.experts is None:
        return {}
    out = {}
    for param, lora in adapter.experts.by_param.items():
        shape = adapter.experts.names.params[param].shape
        out[param] = adapter.experts.rows(param, 0, shape[0], device).reshape(shape)
    return out
