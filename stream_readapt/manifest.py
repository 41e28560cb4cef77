"""The JSON manifest every output carries (manifest.json, and a copy in the safetensors metadata)."""

from __future__ import annotations

import datetime
import json
import math
import shutil
from pathlib import Path

from . import __version__
from .jsonfile import load_json_object

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


def new_manifest(kind: str, **fields) -> dict:
    """The common head of every manifest: tool, version, kind, time, then `fields`."""
    head = {
        "tool": "stream_readapt",
        "version": __version__,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    head.update(fields)
    return head


def input_record(ckpt) -> dict:
    return {"source": ckpt.source, "fingerprint": ckpt.fingerprint()}


def safetensors_metadata(manifest: dict) -> dict[str, str]:
    """A compact copy of the manifest head for `__metadata__`: no per-tensor stats, and no
    creation time, so the same inputs and seed give the same file, byte for byte."""
    head = {k: v for k, v in manifest.items() if k not in ("tensors", "modules", "created", "instruct_config")}
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
        json.dump(_finite(manifest), fh, indent=2)
        fh.write("\n")


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    return load_json_object(path)


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
