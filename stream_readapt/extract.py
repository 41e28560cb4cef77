"""The RE-Adapter Δ = Θ − Φ, extracted a row block at a time.

Full RE-Adapters are written as safetensors shards keyed like the base
(`readapter*.safetensors`), with the instruct model's config and tokenizer so a
later `merge --readapter` can write a complete checkpoint. Rows the instruct
model added to the vocabulary are stored as Θ's rows (Φ is taken as zero there),
so Φ + Δ reproduces Θ everywhere. The low-rank LoRE-Adapter lives in `lore.py`.
"""

from __future__ import annotations

import math
import os

import torch

from .checkpoint import Checkpoint
from .manifest import copy_side_files, input_record, new_manifest, safetensors_metadata, write_manifest
from .plan import TensorPair, plan_pairs, select
from .streaming import (
    DEFAULT_BLOCK_BYTES, check_finite, progress, resolve_device, resolve_dtype, row_blocks, to_device_f32,
)
from .writer import CheckpointWriter, OutputFolder, PlannedTensor, shards_by_size, shards_like


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
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    quiet: bool = True,
    **lore_options,
) -> dict:
    """Write the RE-Adapter Δ = Θ − Φ of `instruct` over `base` to `output`; returns its manifest.

    With `energy` (τ), `rank` or `max_error`, writes a LoRE-Adapter (a PEFT LoRA
    adapter of per-module rank) instead of the full Δ; see `stream_readapt.lore`.

    Args:
        base, instruct: checkpoints Φ and Θ (folders or Hub ids).
        output: folder to create (must be empty unless `overwrite`).
        dtype: storage dtype of Δ (default: the inputs'); float32 makes Φ + Δ
            reproduce a bf16/fp16 Θ bit for bit.
        include, exclude: regexes over tensor names selecting which tensors get a Δ.

    Example:
        >>> manifest = extract("base", "instruct", "readapter")
        >>> manifest["tensors"]["model.norm.weight"]["rel_norm"]
    """
    if energy is not None or rank is not None or max_error is not None:
        from .lore import extract_lore

        return extract_lore(
            base, instruct, output, energy=energy, rank=rank, max_error=max_error, device=device,
            include=include, exclude=exclude, revision=revision, overwrite=overwrite, quiet=quiet, **lore_options,
        )
    if lore_options:
        raise TypeError(f"options {sorted(lore_options)} need energy=, rank= or max_error=")
    out_folder = OutputFolder(output, overwrite=overwrite)
    dev, out_dtype = resolve_device(device), resolve_dtype(dtype)
    with Checkpoint.open(base, revision=revision) as phi, Checkpoint.open(instruct, revision=revision) as theta:
        pairs = plan_pairs(phi, theta)
        chosen = select([p.name for p in pairs], include, exclude)
        pairs = [p for p in pairs if p.name in chosen]
        manifest = new_manifest(
            "readapter",
            inputs={"base": input_record(phi), "instruct": input_record(theta)},
            dtype=str(out_dtype).replace("torch.", "") if out_dtype else "inputs",
            added_rows={p.name: [p.base_rows, p.shape[0]] for p in pairs if p.added_rows},
            base_only=[n for n in phi.names if n not in theta],
            excluded=sorted({n for n in theta.names} - chosen),
        )
        with out_folder as tmp:
            manifest["tensors"] = _write_deltas(tmp, pairs, phi, theta, out_dtype, dev, max_shard_size, block_bytes, manifest, quiet)
            copy_side_files(theta.folder, tmp)
            write_manifest(tmp, manifest)
    manifest["output"] = str(output)
    return manifest


def _write_deltas(tmp, pairs, phi, theta, out_dtype, dev, max_shard_size, block_bytes, manifest, quiet) -> dict:
    dtype_of = lambda p: out_dtype or theta.info(p.name).dtype
    plan = [PlannedTensor(p.name, math.prod(p.shape) * dtype_of(p).itemsize) for p in pairs]
    groups = shards_by_size(plan, max_shard_size) if max_shard_size else shards_like(plan, phi.weight_map)
    writer = CheckpointWriter(tmp, groups, prefix="readapter", metadata=safetensors_metadata(manifest))
    by_name = {p.name: p for p in pairs}
    stats = {}
    bar = progress(sum(t.nbytes for t in plan), "extract", quiet)
    try:
        for name in (n for g in groups for n in g):
            pair = by_name[name]
            writer.begin(name, dtype_of(pair), pair.shape)
            stats[name] = _delta_tensor(writer, pair, phi, theta, dtype_of(pair), dev, block_bytes)
            writer.end()
            bar.update(math.prod(pair.shape) * dtype_of(pair).itemsize)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return stats


def _delta_tensor(writer, pair: TensorPair, phi, theta, dtype, dev, block_bytes) -> dict:
    """Δ rows block by block; returns ‖Δ‖ and ‖Δ‖/‖Φ‖ (over the base rows)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    rows = pair.shape[0] if pair.shape else 1
    delta_sq = base_sq = 0.0
    for start, stop in row_blocks(rows, math.prod(pair.shape[1:]), block_bytes, split_at=pair.base_rows):
        d = to_device_f32(theta.read_rows(pair.name, start, stop), dev).to(work)
        if start < pair.base_rows:
            b = to_device_f32(phi.read_rows(pair.base, start, stop), dev).to(work)
            d.sub_(b)
            base_sq += float(b.double().square().sum())
            delta_sq += float(d.double().square().sum())
        check_finite(d, pair.name)
        writer.write(d.to(dtype))
    rel = math.sqrt(delta_sq / base_sq) if base_sq else (0.0 if delta_sq == 0 else math.inf)
    return {"norm": math.sqrt(delta_sq), "rel_norm": rel}
