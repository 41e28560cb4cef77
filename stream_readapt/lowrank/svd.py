"""Randomized truncated SVD with energy-driven rank selection (the LoRE-Adapter step).

The basis of range(Δ) grows block by block, as in randQB_b: Martinsson & Voronin (2016),
"A randomized blocked algorithm for efficiently computing rank-revealing factorizations of
matrices", SIAM J. Sci. Comput. 38(5). Each block is a Gaussian sketch refined by power
(subspace) iterations, Halko, Martinsson & Tropp (2011), "Finding structure with
randomness", SIAM Review 53(2), Alg. 4.4, renormalized between steps by LU instead of QR as
in Li et al. (2017), "Algorithm 971" (fbpca): same subspaces, several times cheaper.
Because Q has orthonormal columns, ‖Δ‖_F² − ‖QᵀΔ‖_F² is the exact energy Δ keeps outside
span(Q): the stopping test for an energy target. The basis then grows on until it is
comfortably larger than the estimated rank, and k comes from the SVD of the small B = QᵀΔ.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from .target import RankTarget

logger = logging.getLogger(__name__)

# Size of the float64 copy of a row chunk when summing ‖Δ‖_F²: small enough to stay in
# cache (2× faster than 1024-row chunks on a 2048×5632 matrix). A float32 norm is no
# substitute: torch's float32 reduction was off by 1e-3 on that matrix.
_ENERGY_CHUNK_BYTES = 4 << 20


@dataclass
class LowRankFactors:
    """A truncated SVD Δ ≈ U·diag(S)·Vh, as returned by `randomized_svd`.

    U·diag(S)·Vh equals P·Δ with P = U·Uᵀ an orthogonal projector (U = Q·Ub spans a
    subspace of the sketch basis and S, Vh come from the exact SVD of QᵀΔ), so
    ‖Δ − U·diag(S)·Vh‖_F² = ‖Δ‖_F² − Σ S_i². `relative_error` relies on this; it holds up
    to float32 rounding, about 1e-7 of the energy, so errors below ~1e-3 are not resolved.
    """

    U: torch.Tensor  # [m, k] float32, orthonormal columns
    S: torch.Tensor  # [k] float32, descending
    Vh: torch.Tensor  # [k, n] float32, orthonormal rows
    total_energy: float  # ‖Δ‖_F², accumulated in float64
    spectrum: torch.Tensor  # every singular value of QᵀΔ (a lower bound of Δ's), float32 CPU
    measured_error: float | None = None  # ‖Δ − U·diag(S)·Vh‖_F / ‖Δ‖_F from the residual itself

    @property
    def rank(self) -> int:
        return self.S.numel()

    @property
    def captured_energy(self) -> float:
        """Σ S_i² / ‖Δ‖_F² in [0, 1]; 1.0 for a zero matrix."""
        if self.total_energy == 0.0:
            return 1.0
        captured = float(torch.linalg.vector_norm(self.S, dtype=torch.float64) ** 2)
        return min(1.0, captured / self.total_energy)

    @property
    def relative_error(self) -> float:
        """‖Δ − U·diag(S)·Vh‖_F / ‖Δ‖_F: measured on the residual where the energy identity
        cannot resolve it (small errors, error targets), else sqrt(1 − captured_energy)."""
        if self.measured_error is not None:
            return self.measured_error
        return math.sqrt(max(0.0, 1.0 - self.captured_energy))


def rank_for_energy(
    singular_values: torch.Tensor, energy: float, *, total_energy: float | None = None
) -> int:
    """Smallest k whose cumulative share Σ_{i<k} σ_i² / total reaches `energy`.

    Args:
        singular_values: σ in descending order, any shape that flattens to [r].
        energy: the share τ to reach, in (0, 1].
        total_energy: the denominator; default Σ σ_i². Pass ‖Δ‖_F² when σ are estimates
            of only part of the spectrum; if the share is never reached, returns r.

    Returns:
        k in [1, r] (0 only for an empty σ; 1 when the total is zero).

    Example:
        >>> rank_for_energy(torch.tensor([2.0, 1.0, 1.0]), 0.6)
        1
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = singular_values.detach().flatten().to(device="cpu", dtype=torch.float64) ** 2
    if sq.numel() == 0:
        return 0
    total = float(sq.sum()) if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 1
    # cumsum in float64 so that τ close to 1 is not lost in rounding
    reached = torch.nonzero(torch.cumsum(sq, 0) >= energy * total)
    return int(reached[0]) + 1 if reached.numel() else sq.numel()


def randomized_svd(
    matrix: torch.Tensor,
    *,
    energy: float | None = None,
    rank: int | None = None,
    max_error: float | None = None,
    max_rank: int | None = None,
    block_size: int = 64,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
    target: RankTarget | None = None,
) -> LowRankFactors:
    """Truncated SVD of a 2-D tensor, with the rank fixed or chosen by an energy target.

    Exactly one target: `energy` τ (keep the smallest k with Σ_{i≤k} σ_i² ≥ τ·‖Δ‖_F²),
    `rank` k, or `max_error` ε (relative Frobenius error; the same as τ = 1 − ε²). Since
    the estimated σ never exceed the true ones, an energy-chosen k is never below the
    exact minimal rank. Runs in float32 on the matrix's device (a tall matrix is handled
    through its transpose); the only SVD is of a small [q, q] factor.

    Cost: (2·power_iters + 2) products of Δ with q columns, where q = k + oversample for a
    fixed rank (oversample at least k/4) and up to 2.5·k + oversample for an energy target (see `_SETTLE_FACTOR`);
    when that reaches min(m, n) the basis is complete and the result exact. Targets finer
    than float32 can resolve (τ > 1 − 1e-6, ε < 1e-3) keep (nearly) every direction.

    Args:
        matrix: [m, n] tensor of any floating dtype, on CPU or CUDA.
        energy: τ in (0, 1].
        rank: k ≥ 1, clamped to min(m, n).
        max_error: ε in [0, 1).
        max_rank: upper bound on k whatever the target.
        block_size: columns added to the basis per step in energy mode (a fixed rank
            uses one block of k + oversample).
        oversample: extra basis columns beyond k (sharpens the top-k estimate); a fixed
            rank uses at least k/4.
        power_iters: power iterations per block (needed on slowly decaying spectra).
        seed: seed of the Gaussian test matrices; the same seed gives identical output.
        target: the four targets above as one parsed RankTarget (instead of them).

    Returns:
        LowRankFactors with rank ≥ 1. A zero matrix gives rank 1 with S = [0] (rank k in
        fixed-rank mode) and unit-vector U, Vh, so adapters built from it stay valid.

    Example:
        >>> f = randomized_svd(torch.randn(300, 517), energy=0.5)
        >>> approx = f.U @ torch.diag(f.S) @ f.Vh
    """
    if target is None:
        target = RankTarget.parse(energy=energy, rank=rank, max_error=max_error, max_rank=max_rank)
    elif (energy, rank, max_error, max_rank) != (None, None, None, None):
        raise ValueError("give target= or energy=/rank=/max_error=/max_rank=, not both")
    wanted = target
    max_rank = target.max_rank
    target, fixed_rank = target.energy_share, target.rank
    _check_options(block_size, oversample, power_iters)
    A = _as_float32_matrix(matrix)
    total = _frobenius_energy(A)
    # Basis vectors live in the shorter dimension: the QRs and B = QᵀA are cheaper.
    transposed = A.shape[0] > A.shape[1]
    if transposed:
        A = A.mT
    limit = min(A.shape)
    k_cap = min(limit, max_rank or limit, fixed_rank or limit)
    if total == 0.0:
        factors = _zero_factors(A, k_cap if fixed_rank else 1)
    else:
        gen = torch.Generator(device=A.device).manual_seed(seed)
        max_basis = min(limit, k_cap + oversample)
        if target is None:  # no stopping test, so one block: fewer passes over A
            # A large fixed k on a slow spectrum needs oversampling in proportion: with k/4
            # the error stays within 1.02x optimal at k = 512 (1.04x with a fixed 8).
            max_basis = min(limit, k_cap + max(oversample, k_cap // 4))
            if 4 * max_basis >= limit:
                # A short side (k/v projections) or a large k: the complete basis is cheap
                # relative to the sketch and makes the result exact (1.02x -> 1.00x). Any
                # complete basis spans everything, so take the identity: B = A, no sketch.
                Q, B = None, A
            else:
                Q, B, _ = _extend_basis(A, _empty_basis(A), max_basis, max_basis, power_iters, gen)
        else:
            Q, B = _energy_basis(A, total, target, max_basis, block_size, oversample,
                                 power_iters, gen)
        factors = _truncate(Q, B, total, target, k_cap)
        # a grown rank is factorized with the same settings (and is measured there)
        refactor = lambda k: randomized_svd(A, target=RankTarget(rank=k), block_size=block_size,  # noqa: E731
                                            oversample=oversample, power_iters=power_iters, seed=seed)
        factors = _measured(A, factors, wanted, k_cap, refactor)
    logger.debug("randomized_svd %s: rank %d of %d estimated, energy %.4f", tuple(matrix.shape),
                 factors.rank, factors.spectrum.numel(), factors.captured_energy)
    return _transpose(factors) if transposed else factors


# Below this relative error, ‖Δ‖² − Σσ² loses its digits to float32 rounding (1e-7 of the
# energy): the error is measured on the residual instead (and an error target checked there).
_RESOLVED_ERROR = 1e-2


def _measured(A: torch.Tensor, factors: LowRankFactors, wanted: RankTarget, k_cap: int, refactor) -> LowRankFactors:
    """Factors whose small error is measured, not inferred; an error target met on the residual
    (the rank grows until it is, or until the basis is complete)."""
    if wanted.max_error is None and factors.relative_error >= _RESOLVED_ERROR:
        return factors
    while True:
        if factors.measured_error is None:
            factors.measured_error = _residual_error(A, factors)
        if wanted.max_error is None or factors.measured_error <= wanted.max_error:
            return factors
        if factors.rank >= k_cap:  # a cap, or float32's own rounding at a complete basis (~1e-7)
            logger.warning("max_error %g not reached on a %s matrix: %.3g at rank %d (the most allowed)",
                           wanted.max_error, tuple(A.shape), factors.measured_error, factors.rank)
            return factors
        grown = min(k_cap, max(factors.rank + 1, math.ceil(factors.rank * 1.25)))
        factors = refactor(grown)


def _residual_error(A: torch.Tensor, f: LowRankFactors) -> float:
    """‖A − U·diag(S)·Vh‖_F / ‖A‖_F, the residual formed in float32 a row chunk at a time and
    summed in float64 (its rounding is ~1e-7 of A, far below any error target it checks)."""
    if f.total_energy == 0.0:
        return 0.0
    US = f.U * f.S
    rows = max(1, _ENERGY_CHUNK_BYTES // (4 * A.shape[1]))
    sq = sum(float(torch.linalg.vector_norm(A[i:i + rows] - US[i:i + rows] @ f.Vh, dtype=torch.float64) ** 2)
             for i in range(0, A.shape[0], rows))
    return math.sqrt(sq / f.total_energy)


def _check_options(block_size, oversample, power_iters) -> None:
    if block_size < 1 or oversample < 0 or power_iters < 0:
        raise ValueError(
            f"need block_size >= 1, oversample >= 0, power_iters >= 0; got {block_size}, "
            f"{oversample}, {power_iters}"
        )


def _as_float32_matrix(matrix: torch.Tensor) -> torch.Tensor:
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.numel() == 0:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix)
        raise ValueError(f"randomized_svd needs a non-empty 2-D tensor, got {shape}")
    if not matrix.dtype.is_floating_point:  # also rejects complex and integer tensors
        raise ValueError(f"randomized_svd needs a real floating tensor, got {matrix.dtype}")
    return matrix.detach().to(torch.float32)


def _frobenius_energy(A: torch.Tensor) -> float:
    """‖A‖_F² in float64, chunked; raises on NaN/Inf (a finite float32 cannot overflow it)."""
    rows = max(1, _ENERGY_CHUNK_BYTES // (8 * A.shape[1]))
    # accumulated on the device: one synchronization, not one per chunk
    total = float(sum(torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
                      for chunk in A.split(rows)))
    if not math.isfinite(total):
        raise ValueError(
            f"matrix of shape {tuple(A.shape)} contains NaN or Inf; check the checkpoint "
            "tensors it came from"
        )
    return total


def _empty_basis(A):
    return A.new_empty((A.shape[0], 0)), A.new_empty((0, A.shape[1]))


def _energy_basis(A, total, target, max_basis, block, oversample, power_iters, gen):
    """Q, B holding target·total of A's energy, then grown on to _SETTLE_FACTOR·k̂ + oversample
    columns so that the top-k̂ directions, not just the energy, are accurate."""
    basis, captured, want = _empty_basis(A), 0.0, max_basis
    while basis[0].shape[1] < want:
        q, step = basis[0].shape[1], block
        if total - captured <= (1.0 - target) * total:
            # k̂ only shrinks as the basis improves: re-estimate it while closing half the gap.
            want = min(want, _settled_basis(basis[1], total, target) + oversample)
            step = max(block, (want - q + 1) // 2)
        if q >= want:
            break
        *basis, gained = _extend_basis(A, basis, min(want, q + step), block, power_iters, gen)
        captured += gained
    return basis


def _extend_basis(A, basis, size, block, power_iters, gen):
    """Grow (Q [m, q], B = QᵀA [q, n]) to `size` columns; also returns the energy added."""
    Q, B = basis
    gained = 0.0
    while Q.shape[1] < size:
        Qi = _range_block(A, Q, min(block, size - Q.shape[1]), power_iters, gen)
        Bi = Qi.mT @ A  # only the new rows of B
        Q, B = torch.cat([Q, Qi], 1), torch.cat([B, Bi], 0)
        gained += float(torch.linalg.vector_norm(Bi, dtype=torch.float64) ** 2)
        logger.debug("randomized_svd: basis %d of %d columns", Q.shape[1], size)
    return Q, B, gained


# With a basis of only k̂ + oversample columns the energy of the top k̂ directions comes out
# short by up to a few percent on flat spectra (too few power iterations to separate
# σ_k̂ from its neighbours); 2.5·k̂ keeps it within 0.2 points of the optimum in the tests.
_SETTLE_FACTOR = 2.5


def _settled_basis(B, total, target) -> int:
    # σ̂² are the eigenvalues of the small Gram B·Bᵀ; precise enough to size the basis.
    sq = torch.linalg.eigvalsh((B @ B.mT).double()).flip(0).clamp_min(0)
    k = rank_for_energy(sq.sqrt(), target, total_energy=total)
    return math.ceil(k * _SETTLE_FACTOR)


def _range_block(A, Q, b, power_iters, gen):
    """b orthonormal columns ⊥ Q approximating the dominant range of (I − QQᵀ)A."""
    omega = torch.randn((A.shape[1], b), generator=gen, device=A.device, dtype=A.dtype)
    Y = A @ omega
    for _ in range(power_iters):
        # Projecting Y off span(Q) makes AᵀY = (A − QB)ᵀY: the iteration sees the deflated
        # operator, so each block chases what the basis still misses.
        Y = _lu_basis(_project_out(Y, Q))
        Y = A @ _lu_basis(A.mT @ Y)
    return _orth_against(Y, Q)


# Factorizations with more columns than this keep every thread (see `_one_thread`).
_THIN_COLUMNS = 512


@contextlib.contextmanager
def _one_thread(X: torch.Tensor):
    """Thin QR / LU / small SVDs gain little from threads on the CPU, and on a busy machine
    OpenMP's spin-waits made them 20-50x slower (measured: 8.4 s vs 0.15 s of QR for 21
    Llama-1B matrices). The big products around them keep every thread, and so do thick
    factorizations (a complete basis: QR of 5632×2048 took 1.66 s on one thread, 1.20 s on
    two; the SVD of its 2048² factor 3.28 s vs 2.32 s, on the quiet 2-core machine)."""
    if X.device.type != "cpu" or min(X.shape[-2:]) > _THIN_COLUMNS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _lu_basis(X):
    """P·L from X = P·L·U: the same range as X, well conditioned (|L_ij| ≤ 1), several times
    cheaper than QR; the power-iteration normalizer of fbpca and scikit-learn."""
    with _one_thread(X):
        return _lu_basis_factor(X)


def _lu_basis_factor(X):
    LU, pivots, _ = torch.linalg.lu_factor_ex(X)  # a zero pivot is fine: that column of L is e_j
    L = LU.tril(-1)
    L.diagonal().fill_(1.0)
    # LAPACK pivots are sequential row swaps; X[perm] = L·U, so P·L puts L's rows back.
    perm = list(range(X.shape[0]))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    out = torch.empty_like(L)
    out[torch.tensor(perm, device=X.device)] = L
    return out


def _project_out(Y, Q):
    return Y - Q @ (Q.mT @ Y) if Q.shape[1] else Y


def _orth_against(Y, Q):
    """Orthonormalize Y against span(Q) and itself (block Gram–Schmidt, twice)."""
    if Q.shape[1] == 0:
        with _one_thread(Y):
            return torch.linalg.qr(Y).Q
    for _ in range(2):
        # The second pass works on unit columns, so it also cleans up blocks that were
        # almost inside span(Q) (rank-deficient A), where one pass leaves O(1) overlap.
        Y = _project_out(Y, Q)
        with _one_thread(Y):
            Y = torch.linalg.qr(Y).Q
    return Y


def _truncate(Q, B, total, target, k_cap) -> LowRankFactors:
    """Factors from B = QᵀA (Q None: the identity, B = A)."""
    # B [q, n] is wide: LAPACK's SVD of it is slow, the SVD of Bᵀ's small R factor is not.
    with _one_thread(B):
        Qb, R = torch.linalg.qr(B.mT)  # B = Rᵀ·Qbᵀ
        Ur, S, Vrh = torch.linalg.svd(R.mT)
    k = k_cap if target is None else rank_for_energy(S, target, total_energy=total)
    k = min(k, k_cap, S.numel())
    U = Ur[:, :k] if Q is None else Q @ Ur[:, :k]
    return LowRankFactors(U=U.contiguous(), S=S[:k].clone(), Vh=Vrh[:k] @ Qb.mT, total_energy=total,
                          spectrum=S.cpu())


def _zero_factors(A, k) -> LowRankFactors:
    m, n = A.shape
    S = torch.zeros(k, device=A.device, dtype=torch.float32)
    eye = dict(device=A.device, dtype=torch.float32)
    return LowRankFactors(U=torch.eye(m, k, **eye), S=S, Vh=torch.eye(k, n, **eye),
                          total_energy=0.0, spectrum=S.cpu())


def _transpose(f: LowRankFactors) -> LowRankFactors:
    """Factors of Aᵀ → factors of A."""
    return LowRankFactors(U=f.Vh.mT.contiguous(), S=f.S, Vh=f.U.mT.contiguous(),
                          total_energy=f.total_energy, spectrum=f.spectrum, measured_error=f.measured_error)
