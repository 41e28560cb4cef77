"""The RE-Adapter Δ = Θ − Φ, extracted a row block at a time.

Full RE-Adapters are written as safetensors shards keyed like the base
(`readapter*.safetensors`), with the instruct model's config and tokenizer so a
later `merge --readapter` can write a complete checkpoint. Rows the instruct
model added to the vocabulary are stored as Θ's rows (Φ is taken as zero there),
so Φ + Δ reproduces Θ everywhere. The low-rank LoRE-Adapter lives in `lowrank/lore.py`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..arch.plan import plan_pairs, select
from ..io.blocks import BlockBuffers, Job
from ..io.checkpoint import Checkpoint, prefetch_inputs
from ..io.writer import OutputFolder
from .manifest import (
    TensorStats,
    as_json,
    copy_side_files,
    input_record,
    new_manifest,
    safetensors_metadata,
    write_manifest,
    write_plain_config,
)
from .options import RunOptions
from .runner import LocalRunner, ShardOutput, plan_shards


def extract(
    base: str | os.PathLike,
    instruct: str | os.PathLike,
    output: str | os.PathLike,
    *,
    energy: float | None = None,
    rank: int | None = None,
    max_error: float | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "auto",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    max_shard_size: int | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    block_bytes: int | None = None,  # float32 bytes per row block; None: the device's best
    quiet: bool = True,
    resume: bool = False,
    **lore_options,
) -> dict:
    """Write the RE-Adapter Δ = Θ − Φ of `instruct` over `base` to `output`; returns its manifest.

    With `energy` (τ), `rank` or `max_error`, writes a LoRE-Adapter (a PEFT LoRA
    adapter of per-module rank) instead of the full Δ; see `stream_readapt.lowrank.lore`.

    Args:
        base, instruct: checkpoints Φ and Θ (folders or Hub ids).
        output: folder to create (must be empty unless `overwrite`).
        dtype: storage dtype of Δ (default: the inputs'). float64 holds Θ − Φ exactly; float32
            does for bf16/fp16 inputs wherever the two exponents are close, and the manifest
            counts the elements where it does not (`inexact_elements`, per tensor `inexact`).
        include, exclude: regexes over tensor names selecting which tensors get a Δ.
        resume: continue a killed run into `output` from its finished, verified shards
            (full RE-Adapters; a LoRE-Adapter is one file and starts afresh).

    Example:
        >>> manifest = extract("base", "instruct", "readapter")
        >>> manifest["tensors"]["model.norm.weight"]["rel_norm"]
    """
    if energy is not None or rank is not None or max_error is not None:
        from ..lowrank.lore import extract_lore

        return extract_lore(
            base, instruct, output, energy=energy, rank=rank, max_error=max_error, dtype=dtype, device=device,
            include=include, exclude=exclude, revision=revision, overwrite=overwrite, quiet=quiet,
            block_bytes=block_bytes, **lore_options,
        )
    if lore_options:
        raise TypeError(f"options {sorted(lore_options)} need energy=, rank= or max_error=")
    out_folder = OutputFolder(output, overwrite=overwrite, inputs=(base, instruct), resume=resume)
    run = RunOptions.resolve(device=device, dtype=dtype, max_shard_size=max_shard_size, block_bytes=block_bytes, quiet=quiet)
    with Checkpoint.open(base, revision=revision) as phi, Checkpoint.open(instruct, revision=revision) as theta:
        run = run.for_inputs(phi, theta, what="the RE-Adapter")
        prefetch_inputs(phi, theta)  # the disk starts while the plan derives the role table
        pairs = plan_pairs(phi, theta)
        chosen = select([p.name for p in pairs], include, exclude)
        pairs = [p for p in pairs if p.name in chosen]
        manifest = new_manifest(
            "readapter",
            inputs={"base": input_record(phi), "instruct": input_record(theta)},
            dtype=run.dtype_name or "inputs",
            added_rows={p.name: [p.base_rows, p.shape[0]] for p in pairs if p.added_rows},
            base_only=[n for n in phi.names if n not in theta],
            excluded=sorted({n for n in theta.names} - chosen),
        )
        with out_folder as tmp:
            manifest["tensors"] = _write_deltas(tmp, pairs, phi, theta, run, manifest)
            manifest["inexact_elements"] = sum(t["inexact"] for t in manifest["tensors"].values())
            copy_side_files(theta.folder, tmp)
            write_plain_config(tmp)
            write_manifest(tmp, manifest)
    manifest["output"] = str(output)
    return manifest


def _write_deltas(tmp, pairs, phi, theta, run: RunOptions, manifest) -> dict:
    plan = plan_shards(pairs, lambda p: run.dtype or theta.info(p.name).dtype, run, phi.weight_map)
    work = DeltaWork(phi, theta, plan.dtype_of, {p.name: [0.0, 0.0, 0] for p in plan.order})
    LocalRunner().run(plan, work, ShardOutput(tmp, "readapter", safetensors_metadata(manifest)), run, "extract")
    return as_json({name: _norms(*sq) for name, sq in work.state.items()})


@dataclass
class DeltaWork:
    """Row blocks of Δ = Θ − Φ, with per tensor Σ Δ², Σ Φ² over the base rows and the elements
    whose stored Δ is not exactly Θ − Φ (`state`: JSON values the journal saves for --resume)."""

    phi: Checkpoint
    theta: Checkpoint
    dtype_of: Callable
    state: dict
    blocks: BlockBuffers | None = None

    def bind(self, blocks: BlockBuffers) -> None:
        self.blocks = blocks

    def reads_of(self, job: Job) -> list:
        own = [(self.theta, job.pair.name, job.start, job.stop, "theta")]
        return own + ([(self.phi, job.pair.base, job.start, job.stop, "phi")] if job.start < job.pair.base_rows else [])

    def compute(self, job: Job) -> torch.Tensor:
        blocks = self.blocks
        d = blocks.read_f32(self.theta, job.pair.name, job.start, job.stop, slot="theta")
        if job.start >= job.pair.base_rows:  # added vocabulary: Φ is zero there
            return d
        b = blocks.read_f32(self.phi, job.pair.base, job.start, job.stop, slot="phi")
        stored = self.dtype_of(job.pair)
        if stored == torch.float64:  # exact differences for float32 inputs
            d, b = d.double(), b.double()
        # Reused buffers: a fresh block-sized tensor per step costs page faults on the CPU.
        scratch = [blocks.get(f"delta.{i}", tuple(d.shape), d.dtype, d.device) for i in range(3)]
        delta = torch.sub(d, b, out=scratch[0])
        sums = self.state[job.pair.name]
        sums[2] += inexact_elements(d, b, delta, stored, scratch=scratch[1:])
        sums[0] += _square_sum(delta)
        sums[1] += _square_sum(b)
        return delta


def inexact_elements(theta: torch.Tensor, phi: torch.Tensor, delta: torch.Tensor, stored: torch.dtype,
                     scratch: list[torch.Tensor] | None = None) -> int:
    """How many elements of Δ = Θ − Φ, stored as `stored`, differ from the exact difference.

    Two bf16 numbers differ exactly in float32 only when their exponents are within ~16 of
    each other (0.033 − 3.3e-7 is not). Knuth's TwoSum recovers the rounding error of the
    subtraction exactly, with no wider type; a cast to a narrower `stored` dtype adds its own.
    `scratch`: two tensors shaped like `delta` to work in (else allocated). Counted as the
    sum of sign(|error|): on the CPU ~5x cheaper than count_nonzero."""
    back, err = scratch if scratch is not None else (torch.empty_like(delta), torch.empty_like(delta))
    torch.add(delta, phi, out=back)
    torch.sub(theta, back, out=err)
    torch.sub(delta, back, out=back)
    err.sub_(back.add_(phi)).abs_()  # err = (Θ − back) − (Φ + (Δ − back)), exactly
    if stored.itemsize < delta.dtype.itemsize:  # |err| + |cast error| is zero iff both are
        err.add_(back.copy_(delta.to(stored)).sub_(delta).abs_())
    err.sign_()
    # a float32 sum of 0s and 1s is exact below 2^24 elements (a CPU block is 2^20)
    return int(err.sum()) if err.numel() < 2**24 else int(torch.count_nonzero(err))


def _norms(delta_sq: float, base_sq: float, inexact: int) -> TensorStats:
    rel = math.sqrt(delta_sq / base_sq) if base_sq else (0.0 if delta_sq == 0 else math.inf)
    return TensorStats(math.sqrt(delta_sq), rel, math.sqrt(base_sq), inexact)


def _square_sum(block: torch.Tensor) -> float:
    flat = block.reshape(-1)
    return float(torch.dot(flat, flat))  # blocked accumulation; blocks are summed in Python floats
