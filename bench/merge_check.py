"""Correctness of a merged checkpoint: Ω = Φ + α·s·B·A + β·(Θ − Φ), tensor by tensor, in row blocks.

`compare` measures two bf16 outputs against each other (ours vs mergekit) and
`compare_reference` measures one against a float64 recomputation from the inputs.
Both read in row blocks, so checking a 70B-sized embedding needs little RAM.
Distances are in bf16 ulps (1 ulp = one step of bf16's 8-bit significand) at two scales:
`max_ulp` at the output's magnitude (strict: where Φ + α·Ψ + β·Δ cancels to nearly zero,
any float32 evaluation is many output-ulps off), and `max_ulp_input` at the magnitude of
the larger of output and base Φ (what "equal up to bf16 rounding" means for a sum of
bf16 terms); plus the share of bit-identical elements and the relative Frobenius error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stream_readapt.io.checkpoint import Checkpoint

ROWS_PER_BLOCK_ELEMS = 2**22
MAX_CHECKED_ELEMS = 2**26  # per tensor: larger tensors are checked on evenly spaced row blocks


@dataclass
class Distance:
    """Running distance between two tensors, fed a row block at a time."""

    max_ulp: float = 0.0
    max_ulp_input: float = 0.0
    equal: int = 0
    count: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    ulp_hist: dict = field(default_factory=dict)

    def update(self, a: torch.Tensor, ref: torch.Tensor, phi: torch.Tensor) -> None:
        a, ref = a.double(), ref.double()
        diff = (a - ref).abs()
        magnitude = torch.maximum(a.abs(), ref.abs())
        ulps = diff / bf16_ulp(magnitude)
        self.max_ulp = max(self.max_ulp, float(ulps.max()) if ulps.numel() else 0.0)
        ulps_in = diff / bf16_ulp(torch.maximum(magnitude, phi.double().abs()))
        self.max_ulp_input = max(self.max_ulp_input, float(ulps_in.max()) if ulps_in.numel() else 0.0)
        self.equal += int((diff == 0).sum())
        self.count += diff.numel()
        self.err_sq += float(diff.square().sum())
        self.ref_sq += float(ref.square().sum())
        for bucket in (0.5, 1, 2, 4):
            self.ulp_hist[f"<={bucket}"] = self.ulp_hist.get(f"<={bucket}", 0) + int((ulps <= bucket).sum())

    def summary(self) -> dict:
        return {"checked": self.count, "max_ulp": round(self.max_ulp, 3), "max_ulp_input": round(self.max_ulp_input, 3),
                "frac_equal": self.equal / max(1, self.count),
                "rel_fro_err": (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0,
                "frac_within_ulp": {k: v / max(1, self.count) for k, v in self.ulp_hist.items()}}


def bf16_ulp(magnitude: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at `magnitude` (x in [2^(e-1), 2^e) has ulp 2^(e-8))."""
    _, exponent = torch.frexp(magnitude.clamp_min(2.0**-126))
    return torch.ldexp(torch.ones_like(magnitude), exponent - 8)


def row_spans(rows: int, row_numel: int, max_elems: int = MAX_CHECKED_ELEMS):
    """Row blocks covering the tensor, or evenly spaced ones (first and last included) up to `max_elems`."""
    step = max(1, ROWS_PER_BLOCK_ELEMS // max(1, row_numel))
    starts = list(range(0, rows, step))
    keep = max(1, max_elems // (step * max(1, row_numel)))
    if len(starts) > keep:
        starts = [starts[round(i * (len(starts) - 1) / max(1, keep - 1))] for i in range(keep)]
    for start in starts:
        yield start, min(start + step, rows)


def _rows_of(ckpt: Checkpoint, name: str) -> tuple[int, int]:
    shape = ckpt.info(name).shape
    return (shape[0] if shape else 1), (shape[1] if len(shape) > 1 else 1)


def compare(a: Checkpoint, b: Checkpoint, base: Checkpoint, name: str) -> dict:
    """Distance of `a`'s tensor to `b`'s (b plays the reference; `base` gives the input scale)."""
    dist = Distance()
    rows, cols = _rows_of(b, name)
    for start, stop in row_spans(rows, cols):
        dist.update(a.read_rows(name, start, stop), b.read_rows(name, start, stop), base.read_rows(name, start, stop))
    return dist.summary()


class Reference:
    """Ω in float64 straight from the inputs (PEFT scale s = lora_alpha / r)."""

    def __init__(self, base: Path, instruct: Path, lora: Path, alpha: float, beta: float):
        self.base, self.instruct = Checkpoint.from_folder(base), Checkpoint.from_folder(instruct)
        self.lora = Checkpoint.from_folder(lora)
        config = json.loads((Path(lora) / "adapter_config.json").read_text())
        self.scale = config["lora_alpha"] / config["r"]
        self.alpha, self.beta = alpha, beta

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        phi = self.base.read_rows(name, start, stop).double()
        theta = self.instruct.read_rows(name, start, stop).double()
        out = phi + self.beta * (theta - phi)
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{key}.lora_A.weight" in self.lora:
            a = self.lora.read(f"{key}.lora_A.weight").double()
            b = self.lora.read_rows(f"{key}.lora_B.weight", start, stop).double()
            out += self.alpha * self.scale * (b @ a)
        return out

    def close(self) -> None:
        for ckpt in (self.base, self.instruct, self.lora):
            ckpt.close()


def compare_reference(outputs: dict[str, Checkpoint], ref: Reference, name: str) -> dict[str, dict]:
    """Distance of each output's tensor to the float64 reference (computed once per block)."""
    dists = {label: Distance() for label in outputs}
    rows, cols = _rows_of(ref.base, name)
    for start, stop in row_spans(rows, cols):
        exact, phi = ref.rows(name, start, stop), ref.base.read_rows(name, start, stop)
        for label, ckpt in outputs.items():
            dists[label].update(ckpt.read_rows(name, start, stop), exact, phi)
    return {label: d.summary() for label, d in dists.items()}


def sample_names(layers: int) -> list[str]:
    """Embedding, lm_head, norms, and LoRA-targeted linears of the first and last layer."""
    last = layers - 1
    return ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight", f"model.layers.{last}.mlp.down_proj.weight",
            f"model.layers.{last}.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]


def reference_names(layers: int) -> list[str]:
    """The few tensors recomputed in float64: two LoRA-targeted linears and a norm."""
    return ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{layers - 1}.mlp.down_proj.weight",
            "model.norm.weight"]
