"""JSON files that must hold an object (configs, indexes, manifests), read with one-line errors.

Sizes are capped before parsing: a config or index is kilobytes (a 70B index ~100 KB), so a
gigabyte of junk named config.json is refused without being read (parsing it whole once cost
2.2 GB of RSS).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .safetensors_reader import CheckpointError

MAX_JSON_BYTES = 64 * 2**20


def _checked_size(path: Path, limit: int) -> None:
    try:
        size = os.stat(path).st_size
    except OSError as e:
        if path.is_symlink():  # ELOOP or a dangling link: not "absent", a broken file
            raise CheckpointError(f"{path}: broken symlink ({e.strerror}); fix or remove the link") from None
        raise
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes, more than the {limit}-byte limit for a JSON file "
                              "(not a config/index? check the file)")


def load_json_object(path: str | Path, *, limit: int | None = None) -> dict:
    """The JSON object in `path`; CheckpointError naming the file when it is too large, not valid
    JSON or not an object (a list or a number parses, and then fails far from here)."""
    path, limit = Path(path), limit or MAX_JSON_BYTES
    _checked_size(path, limit)
    try:
        # O_NONBLOCK: a FIFO (or a device) where a JSON file should be must not hang the run
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket); replace it with the JSON file")
            raw = fh.read(limit + 1)  # the file may have grown since the stat
        if len(raw) > limit:
            raise CheckpointError(f"{path}: more than the {limit}-byte limit for a JSON file")
        value = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def optional_json_object(path: str | Path, *, limit: int | None = None) -> dict:
    """`load_json_object`, or {} when there is no such file; a symlink loop, a dangling link or a
    FIFO is an error, not an absent file (`Path.is_file()` says False for all three)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():  # a FIFO or device there is no absent file
        return {}
    return load_json_object(path, limit=limit)


def write_new_file(path: str | Path, data: bytes) -> None:
    """Write `data` to `path`, which must not exist yet: never over a file this run did not
    create, never through a symlink (O_EXCL refuses both)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        raise CheckpointError(f"{path}: already exists (or is a link); choose a new file name") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
