"""Plan → work units → runner: the one seam every pass goes through.

Two kinds of pass:

- Elementwise passes (extract, merge): `plan_shards` turns the planned tensors into work units,
  one per output shard (the base model's shard layout, or shards of at most `max_shard_size`),
  in write order. A runner streams the units through a `StreamWork` (what to read for a row
  block and how to compute it) into a checkpoint writer.
- Unit passes (LoRE): each unit (a matrix's SVD, a parameter's experts) is computed on its own
  by `UnitWork.compute` and its result written by `UnitWork.write`, in plan order, by one
  writer (a LoRE-Adapter is one PEFT file). Results are small (factors); computing is the cost.

`LocalRunner` runs every unit in this process, in order; a runner over several processes takes
the same plans, hands the units out, and has the writer's process write the results in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from ..arch.plan import TensorPlan
from ..io.blocks import BlockBuffers, Job, stream_pass
from ..io.writer import CheckpointWriter, PlannedTensor, shards_by_size, shards_like
from .options import RunOptions
from .streaming import progress


@dataclass(frozen=True)
class ShardUnit:
    """One output shard: the tensors written to it, in write order (the unit a runner hands out)."""

    index: int
    tensors: tuple[TensorPlan, ...]
    nbytes: int


@dataclass(frozen=True)
class WorkPlan:
    """The units of one pass and each output tensor's dtype."""

    units: tuple[ShardUnit, ...]
    dtype_of: Callable[[TensorPlan], torch.dtype]
    requantize: dict = field(default_factory=dict)  # tensor -> Requantizer: written quantized, its scale after it

    @property
    def groups(self) -> list[list[str]]:
        """Tensor names per shard, as the writer lays them out."""
        return [[p.name for p in u.tensors] for u in self.units]

    @property
    def order(self) -> list[TensorPlan]:
        return [p for u in self.units for p in u.tensors]

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def plan_shards(pairs: list[TensorPlan], dtype_of: Callable[[TensorPlan], torch.dtype], run: RunOptions,
                weight_map: dict[str, str], requantize: dict | None = None) -> WorkPlan:
    """Shards of at most `run.max_shard_size`, else laid out like `weight_map` (the base's).
    `requantize` (tensor -> Requantizer): each such tensor's scale is planned right after it,
    in its shard."""
    requantize = requantize or {}
    pairs = [q for p in pairs for q in ([p, _scale_plan(requantize[p.name])] if p.name in requantize else [p])]
    scale_names = {r.scale_name for r in requantize.values()}
    plain_dtype_of = dtype_of
    dtype_of = lambda p: (requantize[p.name].dtype if p.name in requantize  # noqa: E731
                          else torch.float32 if p.name in scale_names else plain_dtype_of(p))
    sizes = {p.name: math.prod(p.shape) * dtype_of(p).itemsize for p in pairs}
    planned = [PlannedTensor(p.name, sizes[p.name]) for p in pairs]
    groups = shards_by_size(planned, run.max_shard_size) if run.max_shard_size else shards_like(planned, weight_map)
    by_name = {p.name: p for p in pairs}
    units = tuple(ShardUnit(i, tuple(by_name[n] for n in g), sum(sizes[n] for n in g)) for i, g in enumerate(groups))
    return WorkPlan(units, dtype_of, requantize)


def _scale_plan(req) -> TensorPlan:
    return TensorPlan(req.scale_name, req.scale_name, req.scale_shape, req.scale_shape[0], torch.float32)


class StreamWork(Protocol):
    """What a pass computes: the reads a row block needs and the block itself (float32 or 64)."""

    state: dict  # tensor name -> JSON values, saved with each finished shard (for --resume)

    def bind(self, blocks: BlockBuffers) -> None: ...

    def reads_of(self, job: Job) -> list: ...

    def compute(self, job: Job) -> torch.Tensor: ...


class UnitWork(Protocol):
    """A pass of independent units: `compute` may run anywhere, `write` runs in plan order."""

    def cost(self, unit) -> int: ...  # progress (and balance) weight: elements of the unit

    def compute(self, unit) -> Any: ...  # the unit's result (factors), or None: `write` streams it

    def write(self, unit, result) -> None: ...


@dataclass(frozen=True)
class ShardOutput:
    """Where a pass writes: the (partial) folder, the shard file prefix, the safetensors metadata."""

    folder: Path
    prefix: str = "model"
    metadata: dict | None = None


class LocalRunner:
    """Every unit in this process, in plan order, through one set of reused row-block buffers."""

    def run(self, plan: WorkPlan, work: StreamWork, out: ShardOutput, run: RunOptions, label: str) -> None:
        writer = CheckpointWriter(out.folder, plan.groups, prefix=out.prefix, metadata=out.metadata)
        with progress(plan.nbytes, label, run.quiet) as bar, BlockBuffers(run.device) as blocks:
            work.bind(blocks)
            stream_pass(writer, plan.order, dtype_of=plan.dtype_of, blocks=blocks, reads_of=work.reads_of,
                        compute=work.compute, block_bytes=run.block_bytes, bar=bar, state=work.state,
                        requantize=plan.requantize)

    def run_units(self, units: Sequence, work: UnitWork, run: RunOptions, label: str) -> None:
        with progress(sum(work.cost(u) for u in units), label, run.quiet) as bar:
            for unit in units:
                work.write(unit, work.compute(unit))
                bar.update(work.cost(unit))
