"""PEFT LoRA / rsLoRA / DoRA adapters as weight deltas, a row block at a time.

Saved tensor names (PEFT 0.13 - 0.21), after the `base_model.model.` prefix:
  `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r], `<module>.lora_B.bias`
  `<module>.lora_embedding_A` [r, vocab], `<module>.lora_embedding_B` [dim, r]
  `<module>.lora_magnitude_vector` [out] (DoRA)
  `<module>.base_layer.weight` (embedding layers saved with the adapter) and
  `<module>.weight` (modules_to_save): full replacement weights.
Scaling follows PEFT exactly: s = alpha / r (rsLoRA: alpha / sqrt(r)), with alpha
from the first `alpha_pattern` key matching the end of the module name.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .safetensors_reader import CheckpointError

PREFIX = "base_model.model."
_LORA_SUFFIX = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$"
)


@dataclass
class LoraModule:
    """One adapted module: where its factors are and how they scale."""

    module: str
    A: str | None = None
    B: str | None = None
    bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False
    scale: float = 1.0

    @property
    def target(self) -> str:
        return f"{self.module}.weight"


def pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key`: first key whose regex matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class PeftAdapter:
    """A PEFT LoRA adapter folder, read lazily from its safetensors file."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.config = self._read_config()
        self.ckpt = Checkpoint.from_folder(self.folder)
        self.source = str(folder)
        self.modules: dict[str, LoraModule] = {}
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter tensor name
        for key in self.ckpt.names:
            self._classify(key)
        for mod in self.modules.values():
            self._finish(mod)
        self._cache: tuple[str, dict] | None = None

    def _read_config(self) -> dict:
        path = self.folder / "adapter_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: no adapter_config.json (not a PEFT adapter folder)")
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path}: peft_type {config['peft_type']!r} is not supported (only LORA/DoRA)")
        if config.get("fan_in_fan_out"):
            raise CheckpointError(f"{path}: fan_in_fan_out (GPT-2 Conv1D) adapters are not supported")
        return config

    def _classify(self, key: str) -> None:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA_SUFFIX.match(name)
        if m is None:
            # modules_to_save (`x.modules_to_save.default.weight` in old PEFT) and saved base layers
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")
            self.replacements[name] = key
            return
        mod = self.modules.setdefault(m["module"], LoraModule(m["module"]))
        part = m["part"]
        if part.startswith("lora_magnitude_vector"):
            mod.magnitude = key
        elif part == "lora_B.bias":
            mod.bias = key
        else:
            mod.embedding = part.startswith("lora_embedding")
            setattr(mod, "A" if part in ("lora_A.weight", "lora_embedding_A") else "B", key)

    def _finish(self, mod: LoraModule) -> None:
        if mod.A is None or mod.B is None:
            raise CheckpointError(f"{self.folder}: module {mod.module!r} lacks lora_A or lora_B")
        if mod.magnitude and mod.embedding:
            raise CheckpointError(f"{self.folder}: DoRA on embedding {mod.module!r} is not supported")
        r = self.ckpt.info(mod.A).shape[0]
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, mod.module, self.config.get("lora_alpha", r))
        mod.scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    # -- validation -----------------------------------------------------------
    def targets(self) -> set[str]:
        names = {m.target for m in self.modules.values()} | set(self.replacements)
        names |= {f"{m.module}.bias" for m in self.modules.values() if m.bias}
        return names

    def check_base(self, base: Checkpoint, resolve=None) -> None:
        """Every target exists in `base` with matching shapes; else the adapter is for another base."""
        resolve = resolve or (lambda n: n if n in base else None)
        for mod in self.modules.values():
            self._check_module(base, resolve, mod)
        for name, key in self.replacements.items():
            base_name = resolve(name)
            if base_name is None:
                raise CheckpointError(f"{self.source}: saved module {name!r} does not exist in the base {base.source}")
            have, want = self.ckpt.info(key).shape, base.info(base_name).shape
            if have[1:] != want[1:] or have[0] < want[0]:
                raise CheckpointError(
                    f"{self.source}: {name!r} has shape {list(have)} but the base has {list(want)} "
                    "(adapter made for another base?)"
                )

    def _check_module(self, base: Checkpoint, resolve, mod: LoraModule) -> None:
        base_name = resolve(mod.target)
        if base_name is None:
            raise CheckpointError(
                f"{self.source}: target module {mod.module!r} does not exist in the base {base.source} "
                "(adapter made for another base?)"
            )
        rows, cols = base.info(base_name).shape
        a, b = self.ckpt.info(mod.A).shape, self.ckpt.info(mod.B).shape
        if mod.embedding:
            a, b = (a[0], a[1]), (b[0], b[1])
            ok = a[1] == rows and b[0] == cols and a[0] == b[1]
        else:
            ok = a[1] == cols and b[0] == rows and a[0] == b[1]
        if not ok:
            raise CheckpointError(
                f"{self.source}: {mod.module!r} factors {list(a)}x{list(b)} do not fit the base weight "
                f"{[rows, cols]} (adapter made for another base?)"
            )

    # -- deltas -----------------------------------------------------------------
    def _factors(self, mod: LoraModule, device: torch.device) -> dict:
        """A module's small factors on `device`, in float32; one module cached at a time."""
        if self._cache is None or self._cache[0] != mod.module:
            load = lambda k: None if k is None else self.ckpt.read(k).to(device, torch.float32)
            self._cache = (mod.module, {k: load(getattr(mod, k)) for k in ("A", "B", "bias", "magnitude")})
        return self._cache[1]

    def delta_rows(self, name: str, phi: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """Ψ for rows [start, stop) of base tensor `name`, given those base rows `phi` (float32)."""
        psi = None
        if name in self.replacements:  # modules_to_save / saved base layer: Ψ = saved − Φ
            saved = self.ckpt.read_rows(self.replacements[name], start, stop)
            psi = saved.to(phi.device, torch.float32).sub_(phi)
        lora = self._lora_rows(name, phi, start, stop)
        if lora is None:
            return psi
        return lora if psi is None else psi.add_(lora)

    def has(self, name: str) -> bool:
        return name in self.replacements or self._module_of(name) is not None

    def needs_base_rows(self, name: str) -> bool:
        """Whether Ψ of `name` depends on Φ (DoRA, saved full weights): then use `delta_rows`."""
        mod = self._module_of(name)
        dora = mod is not None and mod.magnitude is not None and not name.endswith(".bias")
        return dora or name in self.replacements

    def add_rows_(self, out: torch.Tensor, name: str, start: int, stop: int, weight: float) -> None:
        """out += weight·Ψ[start:stop] for a plain LoRA term, as one fused addmm (no Ψ block)."""
        mod = self._module_of(name)
        if mod is None:
            return
        f = self._factors(mod, out.device)
        w = weight * mod.scale
        if name.endswith(".bias"):
            if mod.bias:
                out.add_(f["bias"][start:stop], alpha=w)
        elif mod.embedding:
            out.addmm_(f["A"][:, start:stop].T, f["B"].T, alpha=w)
        else:
            out.addmm_(f["B"][start:stop], f["A"], alpha=w)

    def _module_of(self, name: str) -> LoraModule | None:
        return self.modules.get(name.rsplit(".", 1)[0])

    def _lora_rows(self, name: str, phi: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        mod = self._module_of(name)
        if mod is None:
            return None
        f = self._factors(mod, phi.device)
        if name.endswith(".bias"):
            return mod.scale * f["bias"][start:stop] if mod.bias else None
        if mod.embedding:  # PEFT: (B @ A)^T * s, so rows of the embedding are columns of A
            lora = (f["A"][:, start:stop].T @ f["B"].T).mul_(mod.scale)
        else:
            lora = (f["B"][start:stop] @ f["A"]).mul_(mod.scale)
        if mod.magnitude is None:
            return lora
        merged = lora.add_(phi)  # DoRA: W' = m / ||Φ + sBA||_row * (Φ + sBA), per output row
        norms = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
        return merged.mul_(f["magnitude"][start:stop, None] / norms).sub_(phi)

    def fingerprint(self) -> str:
        return self.ckpt.fingerprint()

    def close(self) -> None:
        self._cache = None
        self.ckpt.close()
