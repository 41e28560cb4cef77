"""A many-shard base/instruct pair written directly (no transformers): for crash, resume and
concurrency tests, where a run must last long enough to be killed between shards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}


@dataclass(frozen=True)
class ShardedPair:
    base: Path
    instruct: Path
    bytes_per_model: int


def _names(layers: int) -> list[list[str]]:
    proj = ("q_proj", "o_proj")
    return [[f"model.layers.{i}.self_attn.{p}.weight" for p in proj] for i in range(layers)]


def _write(folder: Path, groups: list[list[str]], tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    n = len(groups)
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in group}, folder / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))


def build_sharded_pair(root: Path, *, layers: int = 10, size: int = 1000, seed: int = 0) -> ShardedPair:
    """`layers` shards of two [size, size] float32 matrices each; instruct = base + drift."""
    gen = torch.Generator().manual_seed(seed)
    groups = _names(layers)
    base = {k: torch.randn(size, size, generator=gen) * 0.02 for g in groups for k in g}
    instruct = {k: v + torch.randn(size, size, generator=gen) * 1e-3 for k, v in base.items()}
    _write(root / "base", groups, base)
    _write(root / "instruct", groups, instruct)
    return ShardedPair(root / "base", root / "instruct", sum(v.numel() * 4 for v in base.values()))


def output_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of an output; the manifest without its creation time (the one field that
    differs between two runs of the same inputs)."""
    files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
    if "manifest.json" in files:
        manifest = json.loads(files["manifest.json"])
        manifest.pop("created", None)
        files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files
