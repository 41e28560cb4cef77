"""Role tables kept on disk between runs.

Deriving a table builds the model on the meta device, and that means importing transformers
and the model's modeling code: ~5 s of one core on the 2-core CPU the benchmarks run on,
a third of a warm-cache 1B merge. The table is a pure function of the config, the tensor
keys, the installed transformers and peft, and the code a table comes from (roles.py, table.py, meta.py, quirks.py),
so it is stored under a hash of exactly those and reused; sweeps over α and β, and any rerun, skip the import.

A cached entry is only a shortcut: one that is missing, unreadable, corrupt or written by
another version is ignored and the table derived again; a cache folder that cannot be
written (read-only home, full disk) costs nothing but the time. Only tables derived from
the classes are stored (a name-only fallback depends on what is installed, and is cheap).

Location: `$STREAM_READAPT_CACHE` (a folder; `off` disables the cache), else
`$XDG_CACHE_HOME/stream_readapt`, else `~/.cache/stream_readapt`; tables go to `roles/`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from ..io.jsonfile import load_json_object
from ..io.safetensors_reader import CheckpointError
from .table import ParamInfo, Reach, Role, RoleTable, TensorRole

logger = logging.getLogger(__name__)

FORMAT = 2  # bump when the stored layout changes
MAX_ENTRY_BYTES = 16 * 2**20  # a 1024-layer MoE table is a few MB
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.json")
MAX_ENTRIES = 256  # least recently used entries beyond this are removed when one is stored
_DERIVATION = ("roles.py", "table.py", "meta.py", "quirks.py")  # the code a table comes from: a change derives tables anew
_FIELDS = ("key", "param", "role", "module_class", "embed_scale", "tied_to", "expert", "part", "unfusable", "reach")
_PARAM_FIELDS = ("name", "shape", "transposed", "linear", "reach")


def cache_folder() -> Path | None:
    """Where role tables are kept, or None when the cache is switched off."""
    chosen = os.environ.get("STREAM_READAPT_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else Path(chosen) / "roles"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stream_readapt" / "roles"


def entry_key(config_json: str, keys: list[str]) -> str | None:
    """The hash naming one table's entry; None when transformers is not installed."""
    try:
        version = importlib.metadata.version("transformers") + "/peft " + _version_or_none("peft")
        spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:  # an edited checkout keeps its version string: its mtime tells the copies apart
        stamp = os.stat(spec.origin).st_mtime_ns
        roles_digest = _roles_source_digest()
    except OSError:
        return None
    h = hashlib.sha256()
    for part in (str(FORMAT), version, spec.origin, str(stamp), roles_digest, config_json, "\n".join(keys)):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _version_or_none(package: str) -> str:
    """PEFT's MoE conversion decides how its LoRAs reach some layers (the table's `reach`)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache
def _roles_source_digest() -> str:
    """The derivation code (`_DERIVATION`) as this process imported it (read once per process)."""
    digest = hashlib.sha256()
    for name in _DERIVATION:
        digest.update(Path(__file__).with_name(name).read_bytes())
    return digest.hexdigest()


def load(key: str) -> RoleTable | None:
    """The stored table for `key`, or None (absent, unreadable or not a table of this format)."""
    folder = cache_folder()
    if folder is None:
        return None
    path = folder / f"{key}.json"
    try:
        untrusted = _untrusted(path)
        if untrusted:
            logger.warning("role cache: ignoring %s (%s); deriving the table again", path, untrusted)
            return None
        table = _decode(load_json_object(path, limit=MAX_ENTRY_BYTES), key)
        os.utime(path)  # recently used: kept when the cache is trimmed
        return table
    except FileNotFoundError:
        return None
    except (CheckpointError, OSError, ValueError, TypeError, KeyError) as e:  # corrupt or foreign: derive again
        logger.debug("role cache: ignoring %s (%s)", path, e)
        return None


def _untrusted(path: Path) -> str:
    """Why an entry may not be trusted ('' when it may): anyone who can write it could make a
    merge silently wrong, so it must be a regular file of this user that others cannot write."""
    st = os.lstat(path)  # FileNotFoundError: no entry
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by other users"
    return ""


def store(key: str, table: RoleTable) -> None:
    """Keep `table` for later runs; any failure only means it is derived again next time."""
    folder = cache_folder()
    if folder is None or not table.derived:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(_encode(table, key), fh)
            os.replace(tmp, folder / f"{key}.json")  # readers see the whole entry or none
        except BaseException:
            os.unlink(tmp)
            raise
        _trim(folder)
    except OSError as e:
        logger.debug("role cache: not stored in %s (%s)", folder, e)


def _trim(folder: Path) -> None:
    """Remove the least recently used entries beyond MAX_ENTRIES (another run may race us: fine)."""
    entries = []
    for path in folder.glob("*.json"):
        if not _ENTRY_NAME.fullmatch(path.name):  # only our entries: never a file someone else put there
            continue
        try:
            entries.append((path.stat().st_mtime_ns, path))
        except FileNotFoundError:
            continue
    for _, path in sorted(entries, reverse=True)[MAX_ENTRIES:]:
        path.unlink(missing_ok=True)


def _encode(table: RoleTable, key: str) -> dict:
    def plain(v):
        return v.value if isinstance(v, (Role, Reach)) else list(v) if isinstance(v, tuple) else v

    rows = [[plain(getattr(r, f)) for f in _FIELDS] for r in table.roles.values()]
    params = [[plain(getattr(p, f)) for f in _PARAM_FIELDS] for p in table.params.values()]
    return {"format": FORMAT, "key": key, "model_type": table.model_type, "roles": rows, "params": params}


def _decode(entry: dict, key: str) -> RoleTable:
    """A stored table, every field type-checked (an entry is input like any file read back)."""
    if entry.get("format") != FORMAT or entry.get("key") != key:
        raise ValueError("another format or entry")
    roles = {}
    for row in _rows(entry, "roles", len(_FIELDS)):
        k, param, role, module_class, scale, tied, expert, part, unfusable, reach = row
        _check_types((k, str), (param, str), (module_class, str), (unfusable, str), (tied, (str, type(None))),
                     (expert, (int, type(None))), (part, int))
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise ValueError("malformed row")
        roles[k] = TensorRole(k, param, Role(role), module_class, None if scale is None else float(scale), tied,
                              expert, part, unfusable, Reach(reach))
    params = {}
    for name, shape, transposed, linear, reach in _rows(entry, "params", len(_PARAM_FIELDS)):
        _check_types((name, str), (shape, list), (transposed, bool), (linear, bool))
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError("malformed shape")
        params[name] = ParamInfo(name, tuple(shape), transposed, linear, Reach(reach))
    model_type = entry["model_type"]
    if not isinstance(model_type, str):
        raise ValueError("malformed model_type")
    return RoleTable(model_type, roles, params)


def _rows(entry: dict, field: str, width: int) -> list:
    rows = entry[field]
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == width for r in rows):
        raise ValueError(f"malformed {field}")
    return rows


def _check_types(*pairs) -> None:
    for value, kinds in pairs:
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))):
            raise ValueError("malformed row")
