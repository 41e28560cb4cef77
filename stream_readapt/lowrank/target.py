"""How a matrix's rank is chosen, parsed and checked once: an energy share τ, a fixed rank, or a
relative error target (exactly one), capped by `max_rank`. The dense SVD and the batched one over
experts both read it."""

from __future__ import annotations

from dataclasses import dataclass


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@dataclass(frozen=True)
class RankTarget:
    """Keep the fewest singular directions explaining `energy` of ‖Δ‖_F² (the paper's τ), or `rank`
    of them, or as many as bring the relative Frobenius error to `max_error`; at most `max_rank`.

    Example:
        >>> RankTarget.parse(energy=0.5).energy_share
        0.5
    """

    energy: float | None = None
    rank: int | None = None
    max_error: float | None = None
    max_rank: int | None = None

    @classmethod
    def parse(cls, *, energy=None, rank=None, max_error=None, max_rank=None) -> "RankTarget":
        """The target as a user gave it, checked (ValueError naming the bad value)."""
        given = [name for name, v in (("energy", energy), ("rank", rank), ("max_error", max_error)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of energy, rank, max_error (got {given or 'none'})")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if max_error is not None and not 0.0 <= max_error < 1.0:
            raise ValueError(f"max_error must be in [0, 1), got {max_error}")
        if rank is not None and not _is_count(rank):
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if max_rank is not None and not _is_count(max_rank):
            raise ValueError(f"max_rank must be an integer >= 1 or None, got {max_rank!r}")
        as_float = lambda v: None if v is None else float(v)
        return cls(as_float(energy), rank, as_float(max_error), max_rank)

    @property
    def energy_share(self) -> float | None:
        """The share of ‖Δ‖_F² to keep (an error target e keeps 1 − e²); None for a fixed rank."""
        if self.max_error is not None:
            return 1.0 - self.max_error ** 2
        return self.energy
