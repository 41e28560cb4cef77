"""The JSON manifest every output carries (manifest.json, and a copy in the safetensors metadata)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..io.jsonfile import load_json_object
from ..io.safetensors_reader import CheckpointError

MANIFEST_FILE = "manifest.json"
METADATA_KEY = "stream_readapt"
# Files copied from the instruct model so an output is a complete, chat-ready checkpoint.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# Version of the manifest layout. 2: typed records below, `schema_version`, per-tensor `inexact`.
# Readers accept any version up to theirs (version 1 had no `schema_version` field).
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class InputRecord:
    """One input of a run: where it came from and a fingerprint of its bytes."""

    source: str
    fingerprint: str
    kind: str | None = None  # for the Δ source of a merge: instruct, readapter or lore


@dataclass
class TensorStats:
    """Per tensor of a full RE-Adapter (`extract`)."""

    norm: float  # ‖Δ‖
    rel_norm: float  # ‖Δ‖ / ‖Φ‖
    base_norm: float  # ‖Φ‖: lets `patch_model` tell whether a loaded model is this base
    inexact: int = 0  # elements whose stored Δ is not exactly Θ − Φ


@dataclass
class MergeStats:
    """Per tensor of a merged model: which terms went in."""

    delta: bool
    knowledge: bool
    added_rows: int


@dataclass
class ModuleStats:
    """Per module of a LoRE-Adapter: its layout and, for low-rank modules, the truncation."""

    kind: str  # lora, embedding, full, bias
    shape: list[int]
    rank: int | None = None
    energy: float | None = None  # captured share of ‖Δ‖²
    rel_error: float | None = None
    explained_variance: list[float] | None = None
    explained_variance_step: int | None = None
    base_norm: float | None = None


@dataclass
class ManifestHead:
    """What every manifest starts with."""

    kind: str  # readapter, lore-adapter, merged
    inputs: dict[str, InputRecord]
    tool: str = "stream_readapt"
    version: str = __version__
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def new_manifest(kind: str, *, inputs: dict[str, InputRecord], **settings) -> dict:
    """A manifest: the typed head, then this kind's settings (α, β, τ, dtype, ...).

    The manifest travels as its JSON form (a dict: what `manifest.json` holds, what the API
    returns); its records are the dataclasses above, turned into JSON by `write_manifest`."""
    return {**as_json(ManifestHead(kind, inputs)), **settings}


def input_record(ckpt, kind: str | None = None) -> InputRecord:
    return InputRecord(ckpt.source, ckpt.fingerprint(), kind)


def as_json(obj):
    """Records (dataclasses) as plain JSON values, recursively; optional fields left out when unset."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None or f.default is not None}
    if isinstance(obj, dict):
        return {k: as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_json(v) for v in obj]
    return obj


def safetensors_metadata(manifest: dict) -> dict[str, str]:
    """A compact copy of the manifest head for `__metadata__`: no per-tensor stats, and no
    creation time, so the same inputs and seed give the same file, byte for byte."""
    head = {k: as_json(v) for k, v in manifest.items() if k not in ("tensors", "modules", "created", "instruct_config")}
    return {"format": "pt", METADATA_KEY: json.dumps(head, separators=(",", ":"))}


def _finite(obj):
    """JSON has no NaN/Inf: make them strings so the file stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_manifest(folder: Path, manifest: dict) -> None:
    with open(Path(folder) / MANIFEST_FILE, "w", encoding="utf-8") as fh:
        json.dump(_finite(as_json(manifest)), fh, indent=2)
        fh.write("\n")


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = load_json_object(path)
    version = manifest.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise CheckpointError(f"{path}: manifest schema_version {version!r} is newer than this stream_readapt "
                              f"({__version__}, schema {SCHEMA_VERSION}) reads: upgrade stream-readapt")
    return manifest


def copy_side_files(src: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config / generation config / tokenizer files that exist in `src`."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_symlink() and not (Path(src) / name).exists():  # a loop or a dangling link
            raise FileNotFoundError(f"{Path(src) / name}: broken symlink (a loop, or its target is gone); fix or remove it")
        if name not in skip and (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def write_plain_config(folder: Path) -> None:
    """Drop a copied config's quantization_config: what this tool writes is plain floats."""
    from ..io.quantized import plain_config

    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    config = load_json_object(path)
    plain = plain_config(config)
    if plain != config:
        with open(path, "w") as fh:
            json.dump(plain, fh, indent=2)
