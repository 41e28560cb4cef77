"""`stream-readapt inspect`: what a checkpoint, PEFT adapter or RE-Adapter holds."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from .engine.manifest import read_manifest
from .io.checkpoint import Checkpoint
from .io.safetensors_reader import DTYPE_NAMES
from .terms.peft_adapter import PeftAdapter


def describe(path: str | os.PathLike, *, tensors: bool = False) -> dict:
    """A JSON-able summary of one folder: kind, tensors by dtype, bytes, shards, manifest."""
    folder = Path(path)
    manifest = read_manifest(folder)
    is_adapter = (folder / "adapter_config.json").is_file()
    with Checkpoint.open(folder) as ckpt:
        stored = getattr(ckpt, "inner", ckpt)  # a quantized checkpoint: its files as stored, scales included
        by_dtype: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for name in stored.names:
            info = stored.info(name)
            by_dtype[DTYPE_NAMES[info.dtype]][0] += 1
            by_dtype[DTYPE_NAMES[info.dtype]][1] += info.nbytes
        out = {
            "path": str(folder),
            "kind": (manifest or {}).get("kind") or ("peft-adapter" if is_adapter else "checkpoint"),
            "tensors": len(ckpt.names),
            "bytes": stored.total_bytes,
            "shards": sorted(ckpt.files),
            "dtypes": {k: {"tensors": v[0], "bytes": v[1]} for k, v in sorted(by_dtype.items())},
            "fingerprint": ckpt.fingerprint(),
        }
        scheme = getattr(ckpt, "scheme", None)
        if scheme is not None:  # read as float32 by every command; written back by merge
            out["format"] = {"quantization": scheme.describe(),
                             "quantized_tensors": sum(ckpt.quantized(n) for n in ckpt.names)}
        if tensors:
            out["tensor_list"] = {n: [DTYPE_NAMES[ckpt.info(n).dtype], list(ckpt.info(n).shape)] for n in ckpt.names}
    if is_adapter:
        out["adapter"] = _adapter_summary(folder)
    if manifest:
        out["manifest"] = {k: v for k, v in manifest.items() if k not in ("tensors", "modules")}
        if "modules" in manifest:
            from .lowrank.lore import summarize_modules

            out["lore"] = summarize_modules(manifest["modules"])
    return out


def _adapter_summary(folder: Path) -> dict:
    adapter = PeftAdapter(folder)
    try:
        ranks = {m.module: adapter.ckpt.info(m.A).shape[0] for m in adapter.modules.values()}
        return {
            "modules": len(adapter.modules),
            "dora": any(m.magnitude for m in adapter.modules.values()),
            "rslora": bool(adapter.config.get("use_rslora")),
            "rank_min": min(ranks.values(), default=0),
            "rank_max": max(ranks.values(), default=0),
            "full_tensors": sorted(adapter.replacements),
        }
    finally:
        adapter.close()


def format_summary(info: dict) -> str:
    lines = [f"{info['path']}: {info['kind']}, {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB in {len(info['shards'])} file(s)"]
    if "format" in info:
        f = info["format"]
        lines.append(f"  quantized: {f['quantization']}, {f['quantized_tensors']} tensors (read as float32 with "
                     "their scales; merge writes this format back, --dtype for plain)")
    for dtype, d in info["dtypes"].items():
        lines.append(f"  {dtype:>8}: {d['tensors']} tensors, {d['bytes'] / 2**20:.1f} MiB")
    if "adapter" in info:
        a = info["adapter"]
        lines.append(
            f"  adapter: {a['modules']} LoRA modules, rank {a['rank_min']}..{a['rank_max']}"
            f"{', DoRA' if a['dora'] else ''}{', rsLoRA' if a['rslora'] else ''}, full tensors: {len(a['full_tensors'])}"
        )
    if "lore" in info:
        from .lowrank.lore import format_module_summary

        lines.extend(format_module_summary(info["lore"]))
    if "manifest" in info:
        m = info["manifest"]
        keys = ("version", "created", "alpha", "beta", "energy", "rank", "dtype")
        lines.append("  manifest: " + ", ".join(f"{k}={m[k]}" for k in keys if k in m))
        for role, rec in (m.get("inputs") or {}).items():
            lines.append(f"    {role}: {rec.get('source')} ({str(rec.get('fingerprint'))[:19]}…)")
    for name, (dtype, shape) in info.get("tensor_list", {}).items():
        lines.append(f"    {name}: {dtype} {shape}")
    return "\n".join(lines)


def inspect_paths(paths: list[str], *, tensors: bool = False, plot: str | None = None) -> dict:
    """Describe every path; with `plot`, draw LoRE spectra. Returns {"items": [...], "text": ...}."""
    items = [describe(p, tensors=tensors) for p in paths]
    if plot:
        from .lowrank.lore import plot_spectra

        plot_spectra([Path(p) for p in paths], plot)
    return {"items": items, "text": "\n".join(format_summary(i) for i in items)}


if __name__ == "__main__":
    import sys

    print(json.dumps(inspect_paths(sys.argv[1:]), indent=2))
