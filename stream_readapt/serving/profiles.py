"""Serving profiles: rewrite a full-fidelity PEFT LoRE-Adapter for one consumer.

A PEFT adapter can carry things servers ignore or refuse (modules_to_save, biases,
per-module alpha). A profile says what its consumer carries; `apply_profile`
rewrites the adapter folder so that consumer loads it unchanged and applies the
same Δ PEFT would:

- one global `lora_alpha = r = R` (R: the largest rank kept) and `rank_pattern` for
  the modules whose rank differs, no `alpha_pattern`; each B is pre-scaled by
  s_m·r_m/R (s_m: the module's PEFT scaling), so PEFT, vLLM (`PEFTHelper.
  get_rank_and_scaling`: alpha/rank from the patterns) and llama.cpp (alpha over each
  tensor's own rank, llama-adapter.cpp) all compute s·B·A = the intended Δ;
- `uniform_rank` profiles (SGLang reads one `r`) zero-pad every module to R;
- what is dropped (norm / bias Δ, full tensors, embedding or head LoRA) is named in
  one warning with its share of the adapter's ‖Δ‖_F and recorded in the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io.safetensors_reader import SafetensorsFile
from ..io.writer import SafetensorsShardWriter
from ..peft_format.format import (
    ADAPTER_FILE,
    PREFIX,
    config_scaling,
    factor_keys,
    factor_of,
    write_adapter_config,
)
from .consumers import VLLM_MAX_LORA_RANKS, ServingProfile, get_profile  # noqa: F401

logger = logging.getLogger(__name__)

@dataclass
class LowRank:
    """One module's factors as PEFT stores them (A: [r, in], B: [out, r])."""

    module: str
    kind: str  # "lora" or "embedding"
    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def keys(self) -> tuple[str, str]:
        return factor_keys(self.module, embedding=self.kind == "embedding")


def read_adapter(folder: Path) -> tuple[dict, list[LowRank], list[str]]:
    """adapter_config, low-rank modules (float32) and the names of every other tensor."""
    config = json.loads((folder / "adapter_config.json").read_text())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    with SafetensorsFile(folder / ADAPTER_FILE) as f:
        for key in sorted(f.tensors):
            factor = factor_of(key)
            if factor is None:
                others.append(key)
                continue
            kind = "embedding" if factor.embedding else "lora"
            factors.setdefault(factor.module, {"kind": kind})[factor.part] = f.read(key).float()
    mods = [LowRank(m, d.pop("kind"), d["A"], d["B"]) for m, d in factors.items() if "A" in d and "B" in d]
    return config, mods, others


def is_vocab_module(mod: LowRank, vocab_size: int | None) -> bool:
    return mod.kind == "embedding" or (vocab_size is not None and mod.B.shape[0] == vocab_size)


def lowrank_energy(mod: LowRank, scale: float) -> float:
    """‖s·B·A‖_F² from the r×r Gram matrices (never the full product), in float64: a float32
    product's last digits depend on how BLAS blocks it, and the figure goes into the manifest."""
    B, A = mod.B.double(), mod.A.double()
    return float(scale**2 * torch.trace((B.T @ B) @ (A @ A.T)))


@dataclass
class ProfileReport:
    """What a profile changed; recorded in the manifest under `profile`."""

    name: str
    rank: int
    padded_modules: int
    padding_bytes: int
    dropped: list[str]
    dropped_share: float  # ‖Δ dropped‖_F / ‖Δ of the PEFT adapter‖_F
    needs_max_lora_rank: int | None  # vLLM: the smallest --max-lora-rank that serves it


def apply_profile(folder: str | os.PathLike, profile: str, base) -> dict:
    """Rewrite the PEFT adapter in `folder` (in place) for `profile`; returns the report.

    `base` is the base model's `Checkpoint` (for ‖Δ‖ of dropped full tensors and vocabulary
    checks). Raises ValueError where the profile cannot serve the adapter at all.
    """
    folder, prof = Path(folder), get_profile(profile)
    config, mods, others = read_adapter(folder)
    vocab = (base.config or {}).get("vocab_size")
    refuse_added_tokens(prof, folder, others, mods, base)
    scales = {m.module: config_scaling(config, m.module) for m in mods}
    keep = [m for m in mods if _carried(prof, m, vocab)]
    dropped_lr = [m for m in mods if m not in keep]
    dropped_full = [k for k in others if not _carried_full(prof, k)]
    full_sq = {k: full_delta_energy(folder, k, base) for k in others}
    kept_sq = sum(lowrank_energy(m, scales[m.module]) for m in keep)
    drop_sq = sum(lowrank_energy(m, scales[m.module]) for m in dropped_lr) + sum(full_sq[k] for k in dropped_full)
    total = kept_sq + drop_sq + sum(v for k, v in full_sq.items() if k not in dropped_full)
    rank = max((m.rank for m in keep), default=1)
    if prof.max_rank is not None and rank > prof.max_rank:
        raise ValueError(f"{folder}: rank {rank} exceeds {prof.name}'s largest max_lora_rank {prof.max_rank}; "
                         f"extract again with --max-rank {prof.max_rank} (or a smaller --energy)")
    report = ProfileReport(prof.name, rank, 0, 0, [m.module for m in dropped_lr] + [base_name(k) for k in dropped_full],
                           math.sqrt(drop_sq / total) if total else 0.0, _vllm_rank(rank) if prof.name in ("vllm", "portable") else None)
    _rewrite(folder, prof, config, keep, [k for k in others if k not in dropped_full], scales, rank, report)
    _warn_dropped(report)
    return asdict(report)


def _carried(prof: ServingProfile, mod: LowRank, vocab: int | None) -> bool:
    if mod.kind == "embedding":
        return prof.embedding_lora
    return prof.head_lora or not is_vocab_module(mod, vocab)


def _carried_full(prof: ServingProfile, key: str) -> bool:
    return prof.biases if key.endswith(".bias") else prof.full_tensors


def _vllm_rank(rank: int) -> int | None:
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def refuse_added_tokens(prof: ServingProfile, folder: Path, others: list[str], mods: list[LowRank], base) -> None:
    """A server that keeps the base vocabulary cannot serve rows the base does not have."""
    if prof.added_tokens:
        return
    with SafetensorsFile(folder / ADAPTER_FILE) as f:
        for key in others:
            name = base_name(key)
            rows = f.info(key).shape[0] if f.info(key).shape else 1
            if name in base and rows > base.info(name).shape[0]:
                raise ValueError(
                    f"{folder}: {name} has {rows} rows, the base {base.info(name).shape[0]} "
                    f"(added tokens): {prof.name} serves the base vocabulary only; use the merged checkpoint "
                    "(`stream-readapt merge`) instead"
                )


def base_name(key: str) -> str:
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return name.replace(".base_layer.", ".")


def full_delta_energy(folder: Path, key: str, base) -> float:
    """‖Θ − Φ‖_F² of a saved full tensor, a row block at a time (Φ = 0 on rows the base lacks)."""
    name = base_name(key)
    total = 0.0
    with SafetensorsFile(folder / ADAPTER_FILE) as f:
        shape = f.info(key).shape
        rows = shape[0] if shape else 1
        base_rows = base.info(name).shape[0] if name in base and base.info(name).shape else (1 if name in base else 0)
        step = max(1, (1 << 22) // max(1, math.prod(shape[1:])))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            theta = (f.read_rows(key, start, stop) if shape else f.read(key).reshape(1)).double()
            lo, hi = start, min(stop, base_rows)
            if hi > lo:
                theta[: hi - lo] -= base.read_rows(name, lo, hi).double().reshape(theta[: hi - lo].shape)
            total += float(theta.square().sum())
    return total


def _rewrite(folder, prof, config, keep, full_keys, scales, rank, report) -> None:
    """Write the profile's adapter_model.safetensors and adapter_config.json, replacing the PEFT ones."""
    path = folder / ADAPTER_FILE
    with SafetensorsFile(path) as f:
        # sorted: the same file whatever order the input's metadata came in
        metadata, dtype = dict(sorted(f.metadata.items())), _dtype_of(f)
        full = {k: f.read(k) for k in full_keys}  # only what the profile keeps (norms, biases: small)
    tmp = folder / ".adapter_model.profile.safetensors"
    keys = [k for m in keep for k in m.keys()] + list(full)
    with SafetensorsShardWriter(tmp, keys, metadata) as writer:
        for m in keep:
            A, B = _prescaled(m, scales[m.module], rank if prof.uniform_rank else m.rank, rank, report, dtype.itemsize)
            writer.add(m.keys()[0], A.to(dtype).contiguous())
            writer.add(m.keys()[1], B.to(dtype).contiguous())
        for k, t in full.items():
            writer.add(k, t)
    os.replace(tmp, path)
    ranks = {m.module: (rank if prof.uniform_rank else m.rank) for m in keep}
    config.update(
        r=rank, lora_alpha=rank, use_rslora=False, alpha_pattern={},
        rank_pattern={m: r for m, r in ranks.items() if r != rank},
        target_modules=sorted(ranks),
        modules_to_save=config.get("modules_to_save") if prof.full_tensors else None,
        bias=config.get("bias", "none") if prof.biases else "none",
    )
    if not prof.full_tensors:
        config["ensure_weight_tying"] = False
    write_adapter_config(folder, config)


def _dtype_of(f) -> torch.dtype:
    lora = [k for k in sorted(f.tensors) if factor_of(k) is not None]
    return f.info(lora[0]).dtype if lora else torch.float32


def _prescaled(m: LowRank, scale: float, rank: int, global_rank: int, report: ProfileReport, itemsize: int):
    """Factors with s·B·A unchanged under scaling global_rank/rank, zero-padded to `rank`."""
    B = m.B * (scale * rank / global_rank)
    A = m.A
    if rank > m.rank:
        A = torch.cat([A, A.new_zeros(rank - m.rank, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - m.rank)], dim=1)
        report.padded_modules += 1
        report.padding_bytes += (rank - m.rank) * (A.shape[1] + B.shape[0]) * itemsize
    return A, B


def _warn_dropped(report: ProfileReport) -> None:
    if report.dropped:
        names = ", ".join(report.dropped[:6]) + (f" and {len(report.dropped) - 6} more" if len(report.dropped) > 6 else "")
        logger.warning("profile %s cannot carry %d tensors/modules (%.2f%% of the adapter's ||Δ||_F): %s; "
                       "they stay at the base (use the merged checkpoint to keep them)",
                       report.name, len(report.dropped), 100 * report.dropped_share, names)
