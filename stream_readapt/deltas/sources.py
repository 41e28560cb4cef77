"""Where Δ comes from in a merge: the instruct model itself, a full RE-Adapter, or a LoRE-Adapter.

Each source answers, for one output tensor and a block of base rows Φ (float32,
on the device): `delta_rows` (Δ for those rows, or None when the tensor has no Δ)
and `added_rows` (the rows past the base's vocabulary, taken whole).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..arch.plan import TensorPlan, bind_adapter, check_float, pair_tensor, plan_pairs, roles_of
from ..engine.manifest import InputRecord, read_manifest
from ..engine.streaming import to_device_f32
from ..io.blocks import BlockBuffers
from ..io.checkpoint import Checkpoint
from ..io.safetensors_reader import CheckpointError
from ..terms.fold import Terms, full_terms
from ..terms.peft_adapter import PeftAdapter


class DeltaSource(ABC):
    """Where Δ comes from, for merge and patch_model alike. Names are the base's checkpoint keys.

    `plan` pairs the source with the base (and checks it fits); then, per output tensor and a
    block of base rows Φ (float32, on the device), `delta_rows` gives Δ for those rows (None:
    no Δ for this tensor) and `blend` gives Φ + β·Δ (it may reuse `phi`'s storage);
    `added_rows` gives rows past the base vocabulary, taken whole; `reads` lists the block
    reads `blend` will make, for read-ahead."""

    kind = "?"
    folder: Path
    manifest: dict | None = None
    blocks: BlockBuffers | None = None  # set by the caller to reuse block buffers

    @abstractmethod
    def plan(self, base: Checkpoint) -> list[TensorPlan]: ...

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def reads(self, name: str, start: int, stop: int) -> list: ...

    @abstractmethod
    def delta_rows(self, name: str, phi: torch.Tensor, start: int, stop: int) -> torch.Tensor | None: ...

    @abstractmethod
    def added_rows(self, name: str, start: int, stop: int, device) -> torch.Tensor: ...

    @abstractmethod
    def record(self) -> InputRecord: ...

    @abstractmethod
    def close(self) -> None: ...

    def fold(self, params: dict[str, torch.Tensor], device) -> dict[str, Terms]:
        """Δ for the live layers of a loaded model (`params`: its tensors by checkpoint key)."""
        raise CheckpointError(f"{self.folder}: patch_model takes Δ from a readapter folder (extract it first)")

    def blend(self, name: str, phi: torch.Tensor, beta: float, start: int, stop: int) -> torch.Tensor:
        """Φ + β·Δ for these rows; may reuse `phi`'s storage."""
        d = self.delta_rows(name, phi, start, stop)
        return phi if d is None else phi.add_(d, alpha=beta)


class InstructDelta(DeltaSource):
    """Δ = Θ − Φ computed on the fly from the instruct checkpoint."""

    kind = "instruct"

    def __init__(self, instruct: Checkpoint):
        self.ckpt = instruct
        self.folder = instruct.folder

    def plan(self, base: Checkpoint) -> list[TensorPlan]:
        return plan_pairs(base, self.ckpt)

    def has(self, name: str) -> bool:
        return name in self.ckpt

    def reads(self, name: str, start: int, stop: int) -> list:
        """The block reads `blend` / `added_rows` will make (for read-ahead)."""
        return [(self.ckpt, name, start, stop, "delta")] if name in self.ckpt else []

    def delta_rows(self, name: str, phi: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        return self.read(name, start, stop, phi.device).sub_(phi) if name in self.ckpt else None

    def blend(self, name, phi, beta, start, stop):
        # lerp is exact at β = 0 and β = 1, so (α, β) = (0, 1) reproduces Θ bit for bit.
        return phi.lerp_(self.read(name, start, stop, phi.device), beta)

    def read(self, name: str, start: int, stop: int, device) -> torch.Tensor:
        if self.blocks is not None:
            return self.blocks.read_f32(self.ckpt, name, start, stop, slot="delta")
        return to_device_f32(self.ckpt.read_rows(name, start, stop), device)

    added_rows = read

    def record(self) -> InputRecord:
        return InputRecord(self.ckpt.source, self.ckpt.fingerprint(), self.kind)

    def close(self) -> None:
        self.ckpt.close()


class FullDelta(InstructDelta):
    """Δ read from a full RE-Adapter written by `extract` (added rows are Θ's rows: Φ is zero there)."""

    kind = "readapter"
    blend = DeltaSource.blend

    def __init__(self, folder: Path, manifest: dict):
        super().__init__(Checkpoint.from_folder(folder))
        self.manifest = manifest

    def plan(self, base: Checkpoint) -> list[TensorPlan]:
        pairs = {n: pair_tensor(base, n, tuple(self.ckpt.info(n).shape), self.ckpt.source, self.ckpt.info(n).dtype)
                 for n in self.ckpt.names}
        dropped = set(self.manifest.get("base_only", []))
        for name in base.names:  # tensors the extraction left out keep Δ = 0
            if name not in pairs and name not in dropped:
                pairs[name] = _base_pair(base, name)
        return _in_base_order(base, pairs)

    def delta_rows(self, name, phi, start, stop):
        return self.read(name, start, stop, phi.device) if name in self.ckpt else None

    def fold(self, params, device):
        terms: dict[str, Terms] = {}
        full_terms(self.ckpt.names, self.ckpt.read, params, "beta", terms)
        return terms


class LoreDelta(DeltaSource):
    """Δ from a LoRE-Adapter (a PEFT LoRA adapter folder written by `extract --energy/--rank`)."""

    kind = "lore"

    def __init__(self, folder: Path, manifest: dict | None):
        self.adapter = PeftAdapter(folder)
        self.folder = Path(folder)
        self.manifest = manifest

    def plan(self, base: Checkpoint) -> list[TensorPlan]:
        bind_adapter(self.adapter, base)
        pairs = {name: _base_pair(base, name) for name in base.names}
        copies = set((self.manifest or {}).get("tied_copies", []))  # PEFT's tied lm_head copy: not ours
        for name, key in self.adapter.replacements.items():  # full tensors, maybe with added rows
            if name in copies:
                continue
            info = self.adapter.ckpt.info(key)
            pairs[name] = pair_tensor(base, name, tuple(info.shape), self.adapter.source, info.dtype)
        return _in_base_order(base, pairs)

    def has(self, name: str) -> bool:
        return self.adapter.has(name)

    def reads(self, name: str, start: int, stop: int) -> list:
        return []  # small factors, read once per module

    def delta_rows(self, name, phi, start, stop):
        return self.adapter.delta_rows(name, phi, start, stop)

    def blend(self, name, phi, beta, start, stop):
        if self.adapter.needs_base_rows(name):
            return super().blend(name, phi, beta, start, stop)
        self.adapter.add_rows_(phi, name, start, stop, beta)  # Φ + β·B·A in one addmm
        return phi

    def fold(self, params, device):
        return self.adapter.fold(params, device, scale="beta")  # a LoRA of scaling 1

    def added_rows(self, name, start, stop, device):
        key = self.adapter.replacements[name]
        return to_device_f32(self.adapter.ckpt.read_rows(key, start, stop), device)

    def record(self) -> InputRecord:
        return InputRecord(str(self.folder), self.adapter.fingerprint(), self.kind)

    def close(self) -> None:
        self.adapter.close()


def _base_pair(base: Checkpoint, name: str) -> TensorPlan:
    info = base.info(name)
    check_float(info.dtype, name, base.source)
    return TensorPlan(name, name, info.shape, info.shape[0] if info.shape else 1, info.dtype, roles_of(base).of(name))


def _in_base_order(base: Checkpoint, pairs: dict[str, TensorPlan]) -> list[TensorPlan]:
    order = {n: i for i, n in enumerate(base.names)}
    return [pairs[n] for n in sorted(pairs, key=lambda n: order.get(n, len(order)))]


def _open_lore(folder: Path, manifest: dict | None) -> DeltaSource | None:
    """A PEFT LoRA adapter folder (ours from `extract --energy`, or any LoRA used as Δ)."""
    return LoreDelta(folder, manifest) if (folder / "adapter_config.json").is_file() else None


def _open_full(folder: Path, manifest: dict | None) -> DeltaSource | None:
    """A full RE-Adapter: shards of Δ keyed like the base, with our manifest of kind 'readapter'."""
    return FullDelta(folder, manifest) if manifest is not None and manifest.get("kind") == "readapter" else None


# Tried in order, the first that recognises the folder opens it (as PEFT's _create_new_module does);
# a new delta source is one more entry here.
DISPATCHERS = (_open_lore, _open_full)


def open_readapter(folder: str | os.PathLike) -> DeltaSource:
    """A full RE-Adapter or a LoRE-Adapter folder, told apart by its files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such RE-Adapter folder")
    manifest = read_manifest(folder)
    for dispatch in DISPATCHERS:
        source = dispatch(folder, manifest)
        if source is not None:
            return source
    raise CheckpointError(f"{folder}: not an RE-Adapter (no manifest.json of kind 'readapter')")
