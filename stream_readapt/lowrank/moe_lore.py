"""LoRE on fused experts: a batched randomized SVD per expert matrix, packed the way PEFT's
`target_parameters` LoRA (ParamWrapper) stores it.

Experts come in chunks of a few matrices [c, m, n] (a 128-expert layer never needs more than
`c` experts' Δ at once); for each chunk one Gaussian sketch per expert is refined by power
iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4, batched over experts) and grown until
every expert of the chunk keeps the energy share τ outside which ‖Δ‖_F² − ‖QᵀΔ‖_F² is the
exact residual. Each expert gets its own rank by energy; PEFT needs one rank r per parameter,
so factors are zero-padded to the largest rank (`ExpertPack.padding` says how much).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

from .svd import rank_for_energy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertOptions:
    """How each expert's rank is chosen: an energy share τ or a fixed rank (exactly one)."""

    energy: float | None = None
    rank: int | None = None
    max_rank: int | None = None
    block: int = 32  # sketch columns added per growth step
    oversample: int = 8
    power_iters: int = 2
    seed: int = 0


@dataclass
class ExpertFactors:
    """Δ_e ≈ B·A for one expert (B = U·√S [m, k], A = √S·Vᵀ [k, n]), with its energy record."""

    B: torch.Tensor
    A: torch.Tensor
    total_energy: float
    captured: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def rel_error(self) -> float:
        return math.sqrt(max(0.0, 1.0 - self.captured / self.total_energy)) if self.total_energy else 0.0


@dataclass
class ExpertPack:
    """PEFT ParamWrapper factors: lora_A [r·E, in], lora_B [out, r·E] (expert e: rows e·r…, columns e::E)."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    ranks: list[int] = field(default_factory=list)

    @property
    def padding(self) -> float:
        """Share of the packed rank slots that are zero padding."""
        return 1.0 - sum(self.ranks) / (self.rank * len(self.ranks)) if self.ranks else 0.0


def lowrank_experts(chunks: Iterable[torch.Tensor], options: ExpertOptions) -> list[ExpertFactors]:
    """Per-expert truncated SVDs of Δ given as chunks [c, m, n] (float32, any device)."""
    gen = torch.Generator().manual_seed(options.seed)
    out: list[ExpertFactors] = []
    for chunk in chunks:
        out += _chunk_factors(chunk, options, gen)
    return out


def _chunk_factors(D: torch.Tensor, o: ExpertOptions, gen) -> list[ExpertFactors]:
    # float64 (the energy test needs it exact), one expert at a time (a float64 chunk is 2x the chunk)
    total = torch.stack([d.double().square().sum() for d in D])
    Q = _basis(D, total, o, gen)
    Bq = Q.transpose(1, 2) @ D  # [c, k, n]
    Ub, S, Vh = torch.linalg.svd(Bq, full_matrices=False)
    U = Q @ Ub
    factors = []
    for e in range(D.shape[0]):
        k = _rank(S[e], float(total[e]), o)
        root = S[e, :k].sqrt()
        captured = float(S[e, :k].double().square().sum())
        factors.append(ExpertFactors(U[e, :, :k] * root, root[:, None] * Vh[e, :k], float(total[e]), captured))
    return factors


def _rank(S: torch.Tensor, total: float, o: ExpertOptions) -> int:
    k = o.rank if o.rank is not None else rank_for_energy(S, o.energy, total_energy=total)
    return max(1, min(k, o.max_rank or k, S.numel()))


def _basis(D: torch.Tensor, total: torch.Tensor, o: ExpertOptions, gen) -> torch.Tensor:
    """An orthonormal basis [c, m, k] per expert, grown until every expert reaches its target."""
    c, m, n = D.shape
    limit = min(m, n)
    k = min(limit, (o.rank or o.block) + o.oversample)
    while True:
        Q = _sketch(D, k, o.power_iters, gen)
        kept = (Q.transpose(1, 2) @ D).double().square().sum(dim=(1, 2))
        if o.rank is not None or k >= limit or bool((kept >= o.energy * total * (1 + 1e-6)).all()):
            return Q
        k = min(limit, 2 * k)


def _sketch(D: torch.Tensor, k: int, power_iters: int, gen) -> torch.Tensor:
    omega = torch.randn(D.shape[0], D.shape[2], k, generator=gen).to(D.device)
    Q = torch.linalg.qr(D @ omega).Q
    for _ in range(power_iters):  # subspace iteration, re-orthonormalized each half step
        Q = torch.linalg.qr(D @ torch.linalg.qr(D.transpose(1, 2) @ Q).Q).Q
    return Q


def pack_for_peft(factors: list[ExpertFactors], *, transposed: bool = False) -> ExpertPack:
    """One ParamWrapper's lora_A / lora_B from per-expert factors, zero-padded to a common rank.

    `transposed` experts ([E, in, out], gpt-oss) were decomposed as stored, Δ_e = B·A with Δ_e
    [in, out]; PEFT's delta there is (B'·A')ᵀ, so B' = Aᵀ and A' = Bᵀ.
    """
    pairs = [(f.A.T, f.B.T) if transposed else (f.B, f.A) for f in factors]
    E, r = len(pairs), max(b.shape[1] for b, _ in pairs)
    out_dim, in_dim = pairs[0][0].shape[0], pairs[0][1].shape[1]
    A = torch.zeros(E * r, in_dim, dtype=pairs[0][1].dtype)
    B = torch.zeros(out_dim, r, E, dtype=pairs[0][0].dtype)
    for e, (b, a) in enumerate(pairs):
        k = a.shape[0]
        A[e * r:e * r + k] = a.cpu()
        B[:, :k, e] = b.cpu()
    return ExpertPack(A, B.reshape(out_dim, r * E), r, [f.rank for f in factors])
