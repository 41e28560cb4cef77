"""LoRE-Adapt: the RE-Adapter truncated per matrix, written as a PEFT LoRA adapter.

For every selected 2-D weight, Δ = Θ − Φ is assembled on the device from row
blocks and decomposed by our randomized SVD (`lowrank.svd.randomized_svd`), keeping
the fewest directions that explain a share τ of ‖Δ‖_F² (or a fixed rank, or a
relative-error target). The factors are split evenly, B = U·√S and A = √S·Vᵀ,
with lora_alpha = r per module (scaling 1), so `PeftModel.from_pretrained(base, dir)`
turns the base into an approximation of the instruct model.
Tensors that stay full (norms, embeddings unless `embeddings="lora"`, tensors with
added vocabulary) are saved as PEFT `modules_to_save` holding Θ; biases as
`bias="all"` entries holding Θ's bias.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch.plan import Role, RoleTable, TensorPlan, plan_pairs, roles_of, select, ties_embeddings
from ..arch.quirks import quirks_of
from ..engine.manifest import (
    ModuleStats,
    as_json,
    copy_side_files,
    input_record,
    new_manifest,
    safetensors_metadata,
    write_manifest,
)
from ..engine.options import RunOptions
from ..engine.runner import LocalRunner
from ..engine.streaming import check_finite, row_blocks
from ..io.checkpoint import Checkpoint
from ..io.jsonfile import write_new_file
from ..io.ownership import raise_allocation_error
from ..io.quantized import plain_config
from ..io.safetensors_reader import CheckpointError
from ..io.writer import OutputFolder, SafetensorsShardWriter
from ..optional import require
from ..peft_format.format import PREFIX, factor_keys, write_adapter_config
from .param_targets import (
    add_target_parameters,
    options_from,
    ParamTarget,
    param_keys,
    param_target_factors,
    plan_param_targets,
)
from .svd import LowRankFactors, randomized_svd
from .target import RankTarget

logger = logging.getLogger(__name__)

SERVING_RANK_LIMITS = (64, 128, 256)  # common max_lora_rank settings (vLLM accepts at most 256 by default builds)
EXPERT_CHUNK = 8  # experts decomposed together: memory is this many experts' Δ, never the layer
SPECTRUM_POINTS = 256  # explained-variance points kept per module in the manifest (for plots)


@dataclass(frozen=True)
class Target:
    """How one instruct tensor goes into the adapter: the plan of the tensor and its layout."""

    pair: TensorPlan
    role: str  # layout: "lora", "embedding" (lora_embedding_A/B), "full" (modules_to_save), "bias"
    source: str | None = None  # instruct tensor to read, when not pair.name (a tied lm_head)
    key: str | None = None  # adapter key, when not derived from the name (under a ParamWrapper)

    @property
    def module(self) -> str:
        """PEFT's module name: the in-memory one (GPT-NeoX's `embed_out` is `lm_head` there)."""
        return self.pair.param.rsplit(".", 1)[0]

    @property
    def transposed(self) -> bool:
        return self.pair.kind is Role.CONV1D


LOWRANK_ROLES = (Role.LINEAR, Role.CONV1D)


def layout_of(p: TensorPlan, embeddings: str, no_lora: frozenset[str] = frozenset()) -> str:
    """Where a tensor goes in a PEFT adapter, from its role (the role table decides, not its name);
    `no_lora`: module names PEFT will not wrap with a LoRA in this family (they go in whole)."""
    kind = p.kind
    if kind is Role.BIAS:
        return "bias"
    if len(p.shape) != 2 or p.added_rows:
        return "full"
    if kind is Role.EMBEDDING:
        return "embedding" if embeddings == "lora" else "full"
    if kind is Role.LM_HEAD:
        return "lora" if embeddings == "lora" else "full"
    if not p.name.endswith(".weight"):  # gpt-oss's 2-D `experts.gate_up_proj_bias` is no LoRA target
        return "full"
    if p.param.rsplit(".", 1)[0].rpartition(".")[2] in no_lora:  # the owning module's own name
        return "full"
    # A name-only table (no transformers) cannot tell a linear from other matrices: take it for one.
    # Other matrices (routers, per-expert tensors) are candidates: param_targets moves those PEFT
    # can only reach by target_parameters there, and saves the rest whole.
    return "lora" if kind in LOWRANK_ROLES + (Role.EXPERTS, Role.OTHER) else "full"


def classify(pairs: list[TensorPlan], chosen: set[str], embeddings: str, table: RoleTable) -> list[Target]:
    table.require_classes("LoRE-Adapt", names_suffice=True)
    no_lora = quirks_of(table.model_type).no_lora_modules
    return [Target(p, layout_of(p, embeddings, no_lora)) for p in pairs if p.name in chosen]


def tied_head_copy(targets: list[Target], theta: Checkpoint, table: RoleTable) -> list[Target]:
    """PEFT unties a tied lm_head from an embedding saved in modules_to_save unless
    `ensure_weight_tying` is set, and then it expects an lm_head copy in the file."""
    head = table.lm_head
    embed = next((t for t in targets if t.pair.name == table.embedding_key and t.role == "full"), None)
    if embed is None or head is None or head.key in theta or not ties_embeddings(theta.config):
        return []
    copy = TensorPlan(head.key, embed.pair.base, embed.pair.shape, embed.pair.base_rows, embed.pair.dtype, head)
    return [Target(copy, "full", source=embed.pair.name)]


def adapter_keys(targets: list[Target]) -> list[str]:
    """Every tensor name the adapter file will hold (to reserve its header)."""
    lora_modules = {t.module for t in targets if t.role in ("lora", "embedding")}
    keys = []
    for t in targets:
        if t.role == "lora":
            keys += factor_keys(t.module)
        elif t.role == "embedding":
            keys += factor_keys(t.module, embedding=True)
        else:
            keys.append(_full_key(t, lora_modules))
    return keys


def _full_key(t: Target, lora_modules: set[str]) -> str:
    if t.key is not None:
        return t.key
    # A LoRA-wrapped module keeps its original parameters under `base_layer`.
    if t.module in lora_modules:
        return f"{PREFIX}{t.module}.base_layer.{t.pair.param.rsplit('.', 1)[1]}"
    return PREFIX + t.pair.param


@dataclass(frozen=True)
class SvdSettings:
    """How every dense matrix of one LoRE run is factorized."""

    target: RankTarget
    seed: int = 0
    power_iters: int | None = None  # None: randomized_svd's default

    def factorize(self, matrix: torch.Tensor) -> LowRankFactors:
        extra = {} if self.power_iters is None else {"power_iters": self.power_iters}
        return randomized_svd(matrix, target=self.target, seed=self.seed, **extra)


def extract_lore(
    base, instruct, output, *, energy=None, rank=None, max_error=None, max_rank=None, embeddings=None,
    seed=0, dtype=None, device="auto", include=None, exclude=None, revision=None, overwrite=False,
    quiet=True, block_bytes=None, power_iters=None, profile="peft",
) -> dict:
    """Write the LoRE-Adapter of `instruct` over `base` to `output`; returns its manifest.

    Exactly one of `energy` (τ, the paper's 0.5), `rank` or `max_error` picks each
    matrix's rank; `max_rank` caps it. `profile` names the consumer (`stream_readapt.serving.profiles`).
    See `stream_readapt.engine.extract` for the rest.
    """
    from ..serving.consumers import get_profile
    from ..serving.profiles import apply_profile

    embeddings = embeddings or ("full" if get_profile(profile).full_tensors else "lora")
    svd = SvdSettings(RankTarget.parse(energy=energy, rank=rank, max_error=max_error, max_rank=max_rank), seed,
                      power_iters)
    if embeddings not in ("full", "lora"):
        raise ValueError(f"embeddings must be 'full' or 'lora', not {embeddings!r}")
    out_folder = OutputFolder(output, overwrite=overwrite, inputs=(base, instruct))
    run = RunOptions.resolve(device=device, dtype=dtype, block_bytes=block_bytes, quiet=quiet)
    with Checkpoint.open(base, revision=revision) as phi, Checkpoint.open(instruct, revision=revision) as theta:
        run = run.for_inputs(phi, theta, what="the LoRE-Adapter")
        pairs = plan_pairs(phi, theta)
        table = roles_of(phi, theta.names)
        targets = classify(pairs, select([p.name for p in pairs], include, exclude), embeddings, table)
        if not get_profile(profile).added_tokens and any(t.pair.added_rows for t in targets):
            raise ValueError(f"{instruct} adds tokens to the vocabulary: --profile {profile} serves the base "
                             "vocabulary only; use the merged checkpoint (`stream-readapt merge`) instead")
        copies = tied_head_copy(targets, theta, table)
        targets += copies
        # Experts and non-Linear weights (routers) go in by PEFT target_parameters (param_targets.py)
        plan = plan_param_targets(targets, table, phi)
        targets, ptargets = plan.targets, plan.params
        if ptargets and not get_profile(profile).param_targets:
            raise ValueError(f"--profile {profile} does not carry LoRAs on fused experts or routers (PEFT "
                             f"target_parameters, {len(ptargets)} here) yet: use --profile peft, or merge a checkpoint")
        manifest = new_manifest(
            "lore-adapter",
            inputs={"base": input_record(phi), "instruct": input_record(theta)},
            energy=energy, rank=rank, max_error=max_error, max_rank=max_rank, seed=seed, embeddings=embeddings,
            dtype=run.dtype_name or "inputs",
            tied_copies=[t.pair.name for t in copies],
            instruct_config=plain_config(theta.config),
        )
        with out_folder as tmp:
            keys = adapter_keys(targets) + param_keys(ptargets)
            writer = SafetensorsShardWriter(tmp / "adapter_model.safetensors", keys, safetensors_metadata(manifest))
            lora_modules = {t.module for t in targets if t.role in ("lora", "embedding")}
            work = LoreWork(writer, phi, theta, run, svd, lora_modules)
            try:
                LocalRunner().run_units([*targets, *ptargets], work, run, "lore")
                writer.finalize()
            finally:
                writer.close()
            modules = work.modules
            manifest["modules"] = modules
            manifest["serving"] = serving_report(modules)
            config = adapter_config(targets, modules, phi.source, bool(copies))
            add_target_parameters(config, plan, modules)
            write_adapter_config(tmp, config)
            if get_profile(profile).rewrites:
                manifest["profile"] = apply_profile(tmp, profile, phi)
            copy_side_files(theta.folder, tmp, skip=("config.json",))
            write_manifest(tmp, manifest)
    manifest["output"] = str(output)
    return manifest


@dataclass
class LoreWork:
    """LoRE's units on the runner: a matrix's SVD, a parameter's experts (computed, then written
    in plan order), or a tensor kept full (streamed by the writer)."""

    writer: SafetensorsShardWriter
    phi: Checkpoint
    theta: Checkpoint
    run: RunOptions
    svd: SvdSettings
    lora_modules: set[str]
    modules: dict = field(default_factory=dict)  # manifest records by module / parameter

    def cost(self, unit) -> int:
        return math.prod(unit.info.shape if isinstance(unit, ParamTarget) else unit.pair.shape)

    def _dtype(self, key: str) -> torch.dtype:
        return self.run.dtype or self.theta.info(key).dtype

    def compute(self, unit):
        if isinstance(unit, ParamTarget):
            return param_target_factors(unit, self.phi, self.theta, self._dtype(unit.pieces[0].key), self.run.device,
                                        options_from(self.svd.target, self.svd.seed), EXPERT_CHUNK)
        if unit.role in ("lora", "embedding"):
            return lowrank_factors(unit, self.phi, self.theta, self._dtype(unit.source or unit.pair.name),
                                   self.run, self.svd)
        return None

    def write(self, unit, result) -> None:
        if result is None:
            _write_full(self.writer, unit, _full_key(unit, self.lora_modules), self.theta,
                        self._dtype(unit.source or unit.pair.name), self.run.block_bytes)
            self.modules.setdefault(unit.module, as_json(ModuleStats("full", list(unit.pair.shape))))
            return
        tensors, record = result
        for key, tensor in tensors:
            self.writer.add(key, tensor.cpu())
        self.modules[unit.info.name if isinstance(unit, ParamTarget) else unit.module] = record


def delta_matrix(t: Target, phi: Checkpoint, theta: Checkpoint, dev, block_bytes: int) -> tuple[torch.Tensor, float]:
    """Δ of one weight as a float32 matrix on the device, filled a row block at a time, and ‖Φ‖."""
    rows, cols = t.pair.shape
    delta = torch.empty(rows, cols, dtype=torch.float32, device=dev)
    base_sq = 0.0
    for start, stop in row_blocks(rows, cols, block_bytes):
        # Convert straight into Δ's rows: no float32 temporaries for Θ and Φ.
        delta[start:stop].copy_(theta.read_rows(t.pair.name, start, stop).to(dev))
        base = phi.read_rows(t.pair.base, start, stop).to(dev)
        base_sq += float(torch.linalg.vector_norm(base, dtype=torch.float32)) ** 2
        delta[start:stop].sub_(base)
    check_finite(delta, t.pair.name)
    return delta, math.sqrt(base_sq)


def lowrank_factors(t: Target, phi, theta, dtype, run: RunOptions,
                    svd: SvdSettings) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    """A matrix's LoRE factors as PEFT keys them (key, tensor), and its manifest record."""
    try:
        delta, base_norm = delta_matrix(t, phi, theta, run.device, run.block_bytes)
        # A Conv1D weight is stored [in, out]; PEFT's factors are for its [out, in] transpose.
        f = svd.factorize(delta.T if t.transposed else delta)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        raise_allocation_error(e, t.pair.name, t.pair.shape, run.device)
    del delta
    root = f.S.sqrt()
    B, A = f.U * root, root[:, None] * f.Vh  # Δ ≈ B·A, split evenly so neither factor is tiny
    B, A = B.to(dtype), A.to(dtype)
    check_finite(B, t.pair.name)
    check_finite(A, t.pair.name)  # a float16 cast can overflow to Inf
    if t.role == "embedding":  # PEFT's embedding delta is (B·A)ᵀ: store the transposed factors
        a_key, b_key = factor_keys(t.module, embedding=True)
        tensors = [(a_key, B.T.contiguous()), (b_key, A.T.contiguous())]
    else:
        a_key, b_key = factor_keys(t.module)
        tensors = [(a_key, A), (b_key, B)]
    return tensors, module_record(t, f, base_norm)


def module_record(t: Target, f: LowRankFactors, base_norm: float) -> dict:
    """The module's `ModuleStats`, as JSON."""
    energy = f.spectrum.double().square().cumsum(0) / f.total_energy if f.total_energy else f.spectrum.double() * 0
    step = max(1, math.ceil(len(energy) / SPECTRUM_POINTS))
    return as_json(ModuleStats(
        t.role, list(t.pair.shape), rank=f.rank, energy=round(f.captured_energy, 6),
        rel_error=round(f.relative_error, 6), explained_variance=[round(float(v), 5) for v in energy[::step]],
        explained_variance_step=step,
        base_norm=base_norm,  # ‖Φ‖: lets `patch_model` tell whether a loaded model is this base
    ))


def _write_full(writer, t: Target, key: str, theta: Checkpoint, dtype, block_bytes: int) -> None:
    shape = t.pair.shape
    writer.begin(key, dtype, shape)
    rows = shape[0] if shape else 1
    for start, stop in row_blocks(rows, math.prod(shape[1:]), block_bytes):
        block = theta.read_rows(t.source or t.pair.name, start, stop).to(dtype)
        check_finite(block, t.pair.name)  # as written: a float16 cast can overflow to Inf
        writer.write(block)
    writer.end()


def adapter_config(targets: list[Target], modules: dict, base_source: str, tied: bool) -> dict:
    """The LoRE-Adapter's adapter_config.json: per-module ranks by pattern, alpha = rank (scaling 1)."""
    low = [t.module for t in targets if t.role in ("lora", "embedding")]
    ranks = {m: modules[m]["rank"] for m in low}
    default_r = max(ranks.values(), default=1)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_source,
        "r": default_r,
        "lora_alpha": default_r,
        "rank_pattern": {m: r for m, r in ranks.items() if r != default_r},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != default_r},
        "target_modules": low,
        "modules_to_save": sorted({t.module for t in targets if t.role == "full"}) or None,
        "bias": "all" if any(t.role == "bias" for t in targets) else "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": any(t.transposed for t in targets if t.role == "lora"),
        "init_lora_weights": True,
        "inference_mode": True,
        # A tied lm_head must follow the saved / adapted embedding (PEFT >= 0.18 honours this).
        "ensure_weight_tying": tied,
    }
    return config


def serving_report(modules: dict) -> dict:
    """Which modules exceed common serving rank limits (e.g. vLLM's max_lora_rank)."""
    ranks = {m: r["rank"] for m, r in modules.items() if "rank" in r}
    report = {"max_rank": max(ranks.values(), default=0)}
    for limit in SERVING_RANK_LIMITS:
        over = sorted(m for m, r in ranks.items() if r > limit)
        report[f"over_{limit}"] = over
    over = report.get(f"over_{SERVING_RANK_LIMITS[0]}", [])
    if over:
        worst = max(ranks, key=ranks.get)
        logger.warning(
            "%d modules have rank > %d (max %d in %s); servers with a lower max_lora_rank "
            "(vLLM: 16 by default, at most 256 in common builds) will refuse this adapter: %s",
            len(over), SERVING_RANK_LIMITS[0], ranks[worst], worst, ", ".join(over[:5]) + (" ..." if len(over) > 5 else ""),
        )
    return report


def module_type(module: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 and parts[-3].isdigit() else module


def summarize_modules(modules: dict) -> dict:
    """Ranks, energy and errors per module type (mean / min / max)."""
    groups: dict[str, list[dict]] = {}
    for name, rec in modules.items():
        if "rank" in rec:
            groups.setdefault(module_type(name), []).append(rec)
    out = {}
    for kind, recs in sorted(groups.items()):
        ranks = [r["rank"] for r in recs]
        out[kind] = {
            "modules": len(recs),
            "rank_mean": sum(ranks) / len(ranks), "rank_min": min(ranks), "rank_max": max(ranks),
            "energy_mean": sum(r["energy"] for r in recs) / len(recs),
            "rel_error_mean": sum(r["rel_error"] for r in recs) / len(recs),
        }
    return out


def format_module_summary(summary: dict) -> list[str]:
    lines = [f"  {'module type':<22} {'n':>4} {'rank mean':>9} {'min':>5} {'max':>5} {'energy':>7} {'rel err':>7}"]
    for kind, s in summary.items():
        lines.append(
            f"  {kind:<22} {s['modules']:>4} {s['rank_mean']:>9.1f} {s['rank_min']:>5} {s['rank_max']:>5} "
            f"{s['energy_mean']:>7.3f} {s['rel_error_mean']:>7.3f}"
        )
    return lines


def plot_spectra(folders: list[Path], path: str | os.PathLike) -> None:
    """Explained-variance curves per module with the chosen ranks marked (needs matplotlib)."""
    if os.path.lexists(path):  # checked before drawing; write_new_file refuses a race too
        raise CheckpointError(f"{path}: already exists (or is a link); choose a new file name")
    matplotlib = require("matplotlib", "inspect --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..engine.manifest import read_manifest

    fig, ax = plt.subplots(figsize=(8, 5))
    for folder in folders:
        modules = (read_manifest(folder) or {}).get("modules") or {}
        for rec in modules.values():
            if "explained_variance" not in rec:
                continue
            xs = [(i + 1) * rec["explained_variance_step"] for i in range(len(rec["explained_variance"]))]
            (line,) = ax.plot(xs, rec["explained_variance"], lw=0.8, alpha=0.6)
            ax.plot([rec["rank"]], [rec["energy"]], "o", ms=3, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("rank k")
    ax.set_ylabel("explained variance Σσ²(≤k) / ‖Δ‖²")
    ax.set_title("LoRE-Adapter spectra (dots: chosen ranks)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=120, format=Path(path).suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    write_new_file(path, image.getvalue())
