"""Readaptation in one streaming pass: Ω = Φ + α·Ψ + β·Δ, a row block at a time.

Φ is the base, Ψ a knowledge adapter trained on the base (PEFT LoRA/DoRA), Δ
the RE-Adapter (from the instruct model, a full RE-Adapter or a LoRE-Adapter).
Arithmetic is float32 on the chosen device; the result is written in the base
dtype (or `dtype`) as a complete Hugging Face checkpoint with the instruct
model's config, generation config and tokenizer.

Rows the instruct model added to the vocabulary have no Φ (nor Ψ: the knowledge
adapter was trained on the base), so Ω takes Θ's rows there unscaled: a β-scaled
copy would shrink exactly the special tokens the chat template relies on.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch.plan import Role, TensorPlan, bind_adapter, ties_embeddings
from ..deltas.sources import DeltaSource, InstructDelta, open_readapter
from ..io.blocks import BlockBuffers, Job
from ..io.checkpoint import Checkpoint, prefetch_inputs
from ..io.jsonfile import load_json_object
from ..io.safetensors_reader import CheckpointError
from ..io.writer import OutputFolder
from ..terms.peft_adapter import PeftAdapter
from .manifest import (
    InputRecord,
    MergeStats,
    as_json,
    copy_side_files,
    input_record,
    new_manifest,
    safetensors_metadata,
    write_manifest,
    write_plain_config,
)
from .options import RunOptions, Scales
from .requantize import Requantizer
from .runner import LocalRunner, ShardOutput, plan_shards
from .streaming import check_scales

logger = logging.getLogger(__name__)


def merge(
    base: str | os.PathLike,
    output: str | os.PathLike,
    *,
    instruct: str | os.PathLike | None = None,
    readapter: str | os.PathLike | None = None,
    knowledge: str | os.PathLike | None = None,
    alpha: float = 0.5,
    beta: float = 0.5,
    dtype: str | torch.dtype | None = None,
    device: str = "auto",
    max_shard_size: int | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    ignore_base_mismatch: bool = False,
    block_bytes: int | None = None,  # float32 bytes per row block; None: the device's best
    quiet: bool = True,
    resume: bool = False,
) -> dict:
    """Write the readapted model Ω = Φ + α·Ψ + β·Δ to `output`; returns its manifest.

    Args:
        base: pretrained base Φ (folder or Hub id).
        output: folder for the merged Hugging Face checkpoint (must be empty unless `overwrite`).
        instruct / readapter: where Δ comes from (exactly one): the instruct model Θ, or a
            folder written by `extract` (full RE-Adapter or LoRE-Adapter).
        knowledge: optional PEFT LoRA/rsLoRA/DoRA adapter folder trained on the base (Ψ).
        alpha, beta: weights of Ψ and Δ (the paper's defaults: 0.5, 0.5).
        dtype: output dtype (default: the base's).
        resume: continue a killed run into `output` from its finished, verified shards.

    Example:
        >>> merge("base", "out", instruct="instruct", knowledge="lora", alpha=0.5, beta=0.5)
    """
    if (instruct is None) == (readapter is None):
        raise ValueError("give exactly one of instruct= or readapter= (where Δ comes from)")
    check_scales(alpha=alpha, beta=beta)
    out_folder = OutputFolder(output, overwrite=overwrite, inputs=(base, instruct, readapter, knowledge), resume=resume)
    run = RunOptions.resolve(device=device, dtype=dtype, max_shard_size=max_shard_size, block_bytes=block_bytes, quiet=quiet)
    with Checkpoint.open(base, revision=revision) as phi:
        delta = InstructDelta(Checkpoint.open(instruct, revision=revision)) if instruct else open_readapter(readapter)
        psi = PeftAdapter(knowledge) if knowledge else None
        try:
            theta = getattr(delta, "ckpt", None)
            prefetch_inputs(phi, theta)  # the disk starts while the plan derives the role table
            keep_format = theta if run.dtype is None and getattr(theta, "scheme", None) is not None else None
            if keep_format is None:
                run = run.for_inputs(phi, theta, what="the merged model")
            _check_recorded_base(delta, phi, ignore_base_mismatch)
            pairs = delta.plan(phi)
            if psi is not None:
                bind_adapter(psi, phi)
            manifest = new_manifest(
                "merged",
                inputs=_inputs(phi, delta, psi),
                alpha=alpha, beta=beta,
                dtype=run.dtype_name or ("instruct's format" if keep_format else "base"),
                device=str(run.device),
            )
            requantize = requantizers(keep_format, pairs)  # refuses a format it cannot write before any output
            if keep_format is not None:
                manifest["format"] = keep_format.scheme.describe()
            with out_folder as tmp:
                manifest["tensors"] = MergePass(phi, delta, psi, Scales(alpha, beta), run, requantize).write(
                    tmp, pairs, manifest)
                _write_side_files(tmp, delta, phi, pairs, plain=keep_format is None)
                write_manifest(tmp, manifest)
        finally:
            delta.close()
            if psi is not None:
                psi.close()
    manifest["output"] = str(output)
    return manifest


def _inputs(phi, delta, psi) -> dict:
    inputs = {"base": input_record(phi), "delta": delta.record()}
    if psi is not None:
        inputs["knowledge"] = InputRecord(psi.source, psi.fingerprint())
    return inputs


def _check_recorded_base(delta, phi: Checkpoint, ignore: bool) -> None:
    recorded = ((delta.manifest or {}).get("inputs", {}).get("base") or {}).get("fingerprint")
    if not recorded and delta.kind != "instruct":  # e.g. a LoRA from another tool used as a LoRE-Adapter
        logger.warning("%s: no base fingerprint recorded (no stream-readapt manifest): cannot check that it "
                       "was made from %s", delta.folder, phi.source)
    if recorded and recorded != phi.fingerprint():
        msg = f"{delta.folder}: RE-Adapter was extracted from another base than {phi.source}"
        if not ignore:
            raise CheckpointError(msg + " (pass --ignore-base-mismatch to go on)")
        logger.warning(msg)


@dataclass
class MergePass:
    """One streaming pass writing Ω = Φ + α·Ψ + β·Δ, tensor by tensor, a row block at a time."""

    phi: Checkpoint
    delta: DeltaSource
    psi: PeftAdapter | None
    scales: Scales
    run: RunOptions
    requantize: dict = field(default_factory=dict)  # tensor -> Requantizer: written in Θ's quantized format

    def write(self, tmp: Path, pairs: list[TensorPlan], manifest: dict) -> dict:
        requantize = self.requantize
        plan = plan_shards(pairs, lambda p: self.run.dtype or p.dtype, self.run, self.phi.weight_map, requantize)
        # JSON values, since the journal saves them with each shard for --resume
        scales = {r.scale_name for r in requantize.values()}
        self.state = {p.name: as_json(MergeStats(self.scales.beta != 0 and self.delta.has(p.name), False, p.added_rows))
                      for p in plan.order if p.name not in scales}
        LocalRunner().run(plan, self, ShardOutput(tmp, metadata=safetensors_metadata(manifest)), self.run, "merge")
        for stats in self.state.values():  # Σ error², Σ Ω² of a requantized tensor -> its relative error
            err, norm = stats.pop("requantized", (None, None))
            if err is not None:
                stats["requant_rel_error"] = round(math.sqrt(err / norm), 8) if norm else 0.0
        return self.state

    def bind(self, blocks: BlockBuffers) -> None:
        self.delta.blocks = blocks

    def reads_of(self, job: Job) -> list:
        added = job.start >= job.pair.base_rows
        own = [] if added else [(self.phi, job.pair.base, job.start, job.stop, "phi")]
        wants_delta = self.scales.beta != 0 or added
        return own + (self.delta.reads(job.pair.name, job.start, job.stop) if wants_delta else [])

    def compute(self, job: Job) -> torch.Tensor:
        if job.start >= job.pair.base_rows:
            return self.delta.added_rows(job.pair.name, job.start, job.stop, self.run.device)
        return self.block(job.pair, job.start, job.stop)

    def block(self, pair: TensorPlan, start: int, stop: int) -> torch.Tensor:
        alpha, beta, psi = self.scales.alpha, self.scales.beta, self.psi
        base = self.delta.blocks.read_f32(self.phi, pair.base, start, stop, slot="phi")
        with_psi = psi is not None and alpha != 0 and psi.has(pair.name)
        # DoRA and saved weights need Φ's rows, which the blend may overwrite: take Ψ first.
        knowledge = psi.delta_rows(pair.name, base, start, stop) if with_psi and psi.needs_base_rows(pair.name) else None
        out = self.delta.blend(pair.name, base, beta, start, stop) if beta != 0 else base
        if knowledge is not None:
            out.add_(knowledge, alpha=alpha)
        elif with_psi:
            psi.add_rows_(out, pair.name, start, stop, alpha)  # plain LoRA: one fused addmm
        self.state[pair.name]["knowledge"] |= with_psi
        return out


def requantizers(theta, pairs: list[TensorPlan]) -> dict[str, Requantizer]:
    """The tensors written back in Θ's quantized format (those Θ stores quantized)."""
    if theta is None:
        return {}
    out = {}
    for p in pairs:
        if theta.quantized(p.name):
            scale = p.name[: -len("weight")] + theta.scheme.scale_suffix
            dtype = theta.inner.info(p.name).dtype if p.name in theta.scale_of else torch.uint8
            out[p.name] = Requantizer(theta.scheme, dtype, tuple(p.shape), scale)
    return out


def _write_side_files(tmp: Path, delta, phi: Checkpoint, pairs: list[TensorPlan], *, plain: bool = True) -> None:
    """Config, generation config and tokenizer from the instruct side (else the base); `plain`:
    the tensors are plain floats, so the config loses any quantization_config."""
    copied = copy_side_files(delta.folder, tmp)
    recorded = (delta.manifest or {}).get("instruct_config")
    if "config.json" not in copied and recorded:  # a LoRE-Adapter keeps Θ's config in its manifest
        (tmp / "config.json").write_text(json.dumps(recorded, indent=2))
        copied.append("config.json")
    if "config.json" not in copied:
        copy_side_files(phi.folder, tmp, skip=tuple(copied))
    if plain:
        write_plain_config(tmp)
    config_path = tmp / "config.json"
    if config_path.is_file() and any(p.kind is Role.LM_HEAD for p in pairs):
        # A separate lm_head was written: the config must not tie it back to the embeddings.
        config = load_json_object(config_path)
        if ties_embeddings(config, str(config_path)):
            config["tie_word_embeddings"] = False
            with open(config_path, "w") as fh:
                json.dump(config, fh, indent=2)
