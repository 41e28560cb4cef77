"""What an adapter adds to each parameter of a loaded model, folded for the live layers.

The streaming merge asks each source for the rows of Ψ or Δ (`rows`-style methods of the delta
sources and `PeftAdapter`); `patch_model` asks the same objects to `fold` themselves into these
`Terms`, next to those methods: low-rank factors stay factors (the fused kernels apply them),
full tensors (a full RE-Adapter's Δ, a saved weight's Ψ = saved − Φ, expert deltas) stay full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .experts import dense_deltas


@dataclass
class Terms:
    """What one parameter gets on top of Φ: low-rank factors and full tensors, per scale."""

    lore: tuple[torch.Tensor, torch.Tensor] | None = None  # Δ ≈ U·Vᵀ: U [N, k], V [K, k]
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None  # Ψ = s·B·A: (A [r, K], B [N, r], s)
    magnitude: torch.Tensor | None = None  # DoRA m [N]
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # {"beta": Δ, "alpha": Ψ} full tensors


def lowrank_terms(adapter, device, *, as_lore: bool) -> dict[str, Terms]:
    """Terms per base tensor name from a PEFT adapter (a LoRE-Adapter is a LoRA with scale 1)."""
    terms: dict[str, Terms] = {}
    scale = "beta" if as_lore else "alpha"
    for module_key, mod in adapter.bound_modules():
        load = lambda k: adapter.ckpt.read(k).to(device)
        A, B = load(mod.A), load(mod.B)
        t = terms.setdefault(f"{module_key}.weight", Terms())
        if mod.embedding:  # stored as [r, vocab] / [dim, r]: the delta is (B·A)ᵀ = Aᵀ·Bᵀ
            A, B = B.T.contiguous(), A.T.contiguous()  # now rows = B·A, as for a Linear
        if as_lore:
            t.lore = (B * mod.scale, A.T.contiguous())
        else:
            t.lora = (A, B, mod.scale)
            t.magnitude = None if mod.magnitude is None else load(mod.magnitude)
        if mod.bias:
            terms.setdefault(f"{module_key}.bias", Terms()).full[scale] = load(mod.bias) * mod.scale
    return terms


def full_terms(names, read, base_params: dict[str, torch.Tensor], scale: str, into: dict[str, Terms]) -> None:
    """Full deltas: `read(name)` is Δ itself (scale "beta" of a full RE-Adapter) or a saved weight."""
    for name in names:
        if name not in base_params:
            continue
        phi = base_params[name]
        value = read(name)
        value = value[: phi.shape[0]] if phi.dim() else value  # added rows: see patch_model
        into.setdefault(name, Terms()).full[scale] = value.to(phi.device, phi.dtype)


def expert_terms(adapter, device):
    """target_parameters LoRAs (experts, routers) as full deltas of their parameters: the
    reference path, rewritten per scale like norms (no grouped expert kernel yet)."""
    deltas = dense_deltas(adapter, device)
    return list(deltas), deltas.__getitem__


def replacement_terms(adapter, params, scale: str, into: dict[str, Terms]) -> None:
    """modules_to_save / saved base layers hold full weights: their delta is saved − Φ."""
    for name, key in adapter.replacements.items():
        if name in params:
            saved = adapter.ckpt.read(key).to(params[name].device, torch.float32)
            phi = params[name].detach().float()
            into.setdefault(name, Terms()).full[scale] = (saved[: phi.shape[0]] - phi).to(params[name].dtype)


def merge_terms(into: dict[str, Terms], new: dict[str, Terms]) -> None:
    for name, t in new.items():
        have = into.setdefault(name, Terms())
        have.lore = have.lore or t.lore
        have.lora = have.lora or t.lora
        have.magnitude = have.magnitude if have.magnitude is not None else t.magnitude
        have.full.update(t.full)


def adapter_terms(adapter, params: dict[str, torch.Tensor], device, scale: str) -> dict[str, Terms]:
    """Everything a bound PEFT adapter adds, at `scale` ("alpha": a knowledge adapter Ψ; "beta":
    a LoRE-Adapter, i.e. Δ as a LoRA of scaling 1), keyed by the base's checkpoint names."""
    terms: dict[str, Terms] = {}
    merge_terms(terms, lowrank_terms(adapter, device, as_lore=scale == "beta"))
    replacement_terms(adapter, params, scale, terms)
    full_terms(*expert_terms(adapter, device), params, scale, terms)
    return terms
