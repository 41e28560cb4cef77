"""Read one safetensors file a row block at a time, without mapping it.

The format is 8 bytes of little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``) and the
raw tensor bytes. We validate the header once, up front, and then serve row
ranges with positional reads (``os.preadv``) into fresh buffers: consumed bytes
live in the page cache, never in this process's resident set, so peak RSS is
bounded by the row block, not by the tensor or the shard.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names <-> torch dtypes (float8 only where this torch has it).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if getattr(torch, _attr, None) is not None:
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # same cap as the reference implementation


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live inside its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along dim 0 (a 0-d tensor is one "row")."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


class CheckpointError(ValueError):
    """A checkpoint, adapter or index that cannot be used as given."""


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {name!r}") from None


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _parse_header(path: Path, file_size: int, raw: bytes) -> tuple[dict, dict[str, TensorInfo]]:
    # As strict as the reference implementation: what it refuses, we refuse.
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start)
    _check_layout(path, tensors, data_start, file_size)
    return metadata, tensors


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    try:
        dtype = dtype_from_name(entry["dtype"])
        shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} ({e})") from None
    if not all(type(v) is int for v in (*shape, begin, end)):  # no 1.5, no true
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r} (shape and offsets must be integers)")
    info = TensorInfo(name, dtype, shape, data_start + begin, end - begin)
    if any(d < 0 for d in shape) or info.nbytes != info.numel * dtype.itemsize:
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {list(shape)} but {end - begin} bytes (corrupt header)"
        )
    return info


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, file_size: int) -> None:
    """Tensors tile the data exactly, as the format requires: no overlap, no hole, no tail."""
    end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        if info.start < end:
            raise CheckpointError(f"{path}: tensor {info.name!r} overlaps another (corrupt header)")
        if info.start > end:
            raise CheckpointError(f"{path}: {info.start - end} unaccounted bytes before tensor {info.name!r} (corrupt header)")
        end = info.start + info.nbytes
    if end > file_size:
        raise CheckpointError(
            f"{path}: truncated file: header promises {end} bytes, file has {file_size}"
        )
    if end < file_size:
        raise CheckpointError(f"{path}: {file_size - end} bytes after the last tensor (corrupt or not safetensors)")


# Every file opened in this process, by opening order: a run checks, before publishing its
# output, that the inputs it opened were not rewritten meanwhile (see `opened_since`).
_OPEN_SEQ = itertools.count(1)
_OPENED: "weakref.WeakValueDictionary[int, SafetensorsFile]" = weakref.WeakValueDictionary()


def open_sequence() -> int:
    """A mark: files opened after it are listed by `opened_since(mark)`."""
    return next(_OPEN_SEQ)


def opened_since(mark: int) -> list["SafetensorsFile"]:
    return [f for seq, f in sorted(_OPENED.items()) if seq > mark]


def file_state(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten: device, inode, size, modification time."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SafetensorsFile:
    """One validated safetensors file, read by rows.

    Example:
        >>> f = SafetensorsFile("model.safetensors")
        >>> block = f.read_rows("model.embed_tokens.weight", 0, 1024)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        self.state = file_state(self.path)
        size = self.state[2]
        with open(self.path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: truncated file (no safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header")
            raw = fh.read(header_len)
        self.header_bytes = raw
        self.metadata, self.tensors = _parse_header(self.path, size, raw)
        self._fd: int | None = None
        _OPENED[next(_OPEN_SEQ)] = self

    def check_unchanged(self) -> None:
        """CheckpointError when the file was replaced or rewritten since it was opened."""
        try:
            now = file_state(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: input removed during the run ({e.strerror})") from None
        if now != self.state:
            raise CheckpointError(f"{self.path}: input changed during the run (rewritten or replaced), so the "
                                  "output could mix old and new bytes; nothing was written: rerun once it is stable")

    def prefetch(self, nbytes: int) -> int:
        """Ask the kernel to start reading this file's first `nbytes` in the background (no wait,
        no memory of ours); returns the bytes asked for."""
        nbytes = min(nbytes, os.fstat(self._descriptor()).st_size)
        if nbytes > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._descriptor(), 0, nbytes, os.POSIX_FADV_WILLNEED)
        return max(nbytes, 0)

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def read_rows(self, name: str, start: int = 0, stop: int | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (dim 0), as a CPU tensor.

        With `out` (a contiguous CPU tensor of at least that many bytes), the rows are
        read into its memory and a view of it is returned: a reused buffer costs no
        page faults, which matters at gigabytes per second.
        """
        info = self.info(name)
        rows = info.shape[0] if info.shape else 1
        stop = rows if stop is None else min(stop, rows)
        shape = ((stop - start),) + info.shape[1:] if info.shape else ()
        nbytes = (stop - start) * info.row_bytes
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        raw = torch.empty(nbytes, dtype=torch.uint8) if out is None else out.reshape(-1).view(torch.uint8)[:nbytes]
        self._read_into(memoryview(raw.numpy()), info.start + start * info.row_bytes, name)
        return raw.view(info.dtype).reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor (use only for small tensors or where a whole matrix is needed)."""
        return self.read_rows(name)

    def _read_into(self, view: memoryview, offset: int, name: str) -> None:
        fd = self._descriptor()
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
            done += n

    def fingerprint_part(self, samples: int = 4, sample_bytes: int = 4096) -> bytes:
        """What identifies this file cheaply: its header, plus a few small samples of its
        data (two checkpoints of one architecture have byte-identical headers)."""
        data_start = 8 + len(self.header_bytes)
        size = self.path.stat().st_size - data_start
        parts = [self.header_bytes]
        for i in range(samples):
            offset = data_start + (size - sample_bytes) * i // max(1, samples - 1) if size > sample_bytes else data_start
            buf = bytearray(min(sample_bytes, size))
            self._read_into(memoryview(buf), offset, "<fingerprint>")
            parts.append(bytes(buf))
        return b"".join(parts)
