"""JSON files that must hold an object (configs, indexes, manifests), read with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from .safetensors_reader import CheckpointError


def load_json_object(path: str | Path) -> dict:
    """The JSON object in `path`; CheckpointError naming the file when it is not valid JSON or
    not an object (a list or a number parses, and then fails far from here)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
