"""Streaming safetensors writers: tensors are appended as they are produced.

safetensors cannot write incrementally, but the format is simple: 8-byte
header length, JSON header, raw bytes. `SafetensorsShardWriter` reserves room for
the header (sized from the tensor names it will hold), appends each tensor's rows
as they come, then writes the real header padded with spaces (allowed by the
format) into the reserved room. `CheckpointWriter` spreads a planned list of
tensors over shards named the Hugging Face way and writes the index.
Callers write into an `OutputFolder` (ownership.py), which renames into place only on
success; inside one, each finished shard is recorded in its journal (resume.py).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from . import resume
from .ownership import JOURNAL_FILE, OutputFolder, active_output, fsync_path, remove_tree
from .safetensors_reader import DTYPE_NAMES

logger = logging.getLogger(__name__)

# Worst case of one header entry beyond its name: dtype, 4 dims and 2 offsets of 20 digits.
_ENTRY_SLACK = len('"":{"dtype":"F8_E4M3","shape":[],"data_offsets":[,]},') + 4 * 21 + 2 * 20


def _tensor_bytes(block: torch.Tensor) -> memoryview:
    flat = block.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class SafetensorsShardWriter:
    """Writes one .safetensors file tensor by tensor, rows appended in order.

    Example:
        >>> with SafetensorsShardWriter(path, ["w"], {"format": "pt"}) as w:
        ...     w.begin("w", torch.float32, (4, 3)); w.write(rows_0_2); w.write(rows_2_4); w.end()
    """

    def __init__(self, path: str | os.PathLike, names: Iterable[str], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        names = list(names)
        meta_len = len(json.dumps({"__metadata__": self.metadata}))
        reserve = meta_len + sum(len(json.dumps(n)) + _ENTRY_SLACK for n in names) + 16
        self._reserved = reserve + (-(8 + reserve)) % 8  # data starts 8-byte aligned
        # Written under a hidden name, renamed to `path` only by a finalize that passes its checks.
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        self._fh = open(self._partial, "wb")
        self._fh.seek(8 + self._reserved)
        self._entries: dict[str, dict] = {}
        self._names: list[str] = []  # every begin(), duplicates included: checked at finalize
        self._offset = 0
        self._current: tuple[str, int] | None = None  # (name, bytes still expected)
        self._hash = resume.new_hash()  # of the data, as written: the journal's checksum

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        assert self._current is None, "previous tensor not ended"
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        self._names.append(name)
        self._entries[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._dtype = dtype
        self._current = (name, nbytes)

    def write(self, block: torch.Tensor) -> None:
        """Append the next rows of the current tensor (in its declared dtype)."""
        name, left = self._current
        if block.dtype != self._dtype:
            raise TypeError(f"{name}: block dtype {block.dtype} != declared {self._dtype}")
        data = _tensor_bytes(block.cpu() if block.device.type != "cpu" else block)
        if len(data) > left:
            raise ValueError(f"{name}: more bytes written than its shape holds")
        self._fh.write(data)
        self._hash.update(data)
        self._offset += len(data)
        self._current = (name, left - len(data))

    def end(self) -> None:
        name, left = self._current
        if left != 0:
            raise ValueError(f"{name}: {left} bytes short of its declared shape")
        self._current = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole (small) tensor."""
        self.begin(name, tensor.dtype, tuple(tensor.shape))
        self.write(tensor)
        self.end()

    def finalize(self, *, sync: bool = True) -> int:
        """Write the header into its reserved room; returns the data bytes written.

        `sync=False` leaves the fsync to the caller (see `ownership.fsync_path`)."""
        assert self._current is None, "tensor left open"
        try:
            check_layout(self.path, self._names, self._entries, self._offset)
        except ValueError:
            self.close()
            raise
        header = dict(self._entries)
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > self._reserved:
            raise ValueError(f"{self.path}: header larger than reserved ({len(raw)} > {self._reserved})")
        raw += b" " * (self._reserved - len(raw))
        head = struct.pack("<Q", len(raw)) + raw
        self._fh.seek(0)
        self._fh.write(head)
        self._fh.flush()
        header_hash = resume.new_hash()
        header_hash.update(head)
        self.record = resume.ShardRecord(self.path.name, len(head) + self._offset, len(head),
                                         resume.digest_text(header_hash), resume.digest_text(self._hash))
        if sync:
            os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._partial, self.path)
        return self._offset

    def close(self) -> None:
        """Abandon an unfinished file (nothing is left under its name)."""
        if not self._fh.closed:
            self._fh.close()
            self._partial.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.close()


def check_layout(path: Path, names: list[str], entries: dict[str, dict], total: int) -> None:
    """The invariant of a finished file: unique names whose byte ranges tile [0, total)
    exactly (no hole, no overlap). A planning bug fails here, before the file is finished."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{path}: tensor {name!r} written twice (a planning bug); file not finished")
        seen.add(name)
    end = 0
    for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"]):
        start, stop = entry["data_offsets"]
        if start != end:
            kind = "hole" if start > end else "overlap"
            raise ValueError(f"{path}: {kind} of {abs(start - end)} bytes before tensor {name!r}; file not finished")
        end = stop
    if end != total:
        raise ValueError(f"{path}: {total - end} bytes after the last tensor are unaccounted; file not finished")


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor known before it is computed (shape may be an upper bound)."""

    name: str
    nbytes: int


def shards_by_size(plan: list[PlannedTensor], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for t in plan:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t.name)
        size += t.nbytes
    return [g for g in groups if g]


def shards_like(plan: list[PlannedTensor], weight_map: dict[str, str]) -> list[list[str]]:
    """Group like a reference checkpoint's weight_map (its files in name order); names it
    lacks join the group of the tensor planned before them."""
    groups: dict[str, list[str]] = {}
    last = None
    for t in plan:
        last = weight_map.get(t.name, last)
        groups.setdefault(last, []).append(t.name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k is None, k or ""))]


def shard_file_names(prefix: str, count: int) -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class CheckpointWriter:
    """Writes planned tensors, in order, into Hugging Face-named shards plus an index.

    `groups` fixes which tensors share a shard; tensors must be written in the
    order of the flattened groups. Only one shard file is open at a time; a finished
    shard is fsynced by a background thread while the next one is computed, and
    `finalize` waits for every fsync (the output folder is renamed only after).
    """

    def __init__(self, folder: Path, groups: list[list[str]], *, prefix: str = "model", metadata=None):
        self.folder = Path(folder)
        self.groups = groups
        self.files = shard_file_names(prefix, len(groups))
        self.prefix = prefix
        self.metadata = metadata or {}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._order = [(name, gi) for gi, g in enumerate(groups) for name in g]
        self._next = 0
        self._shard: SafetensorsShardWriter | None = None
        self._shard_index = -1
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
        self._syncs: list[Future] = []
        self.state: dict = {}  # per-tensor caller state saved with each shard (see track_state)
        self.journal = self._open_journal()
        self.done = {n for g, f in zip(groups, self.files) if f in self.journal.shards for n in g} if self.journal else set()
        self._skip_done()

    def _open_journal(self) -> "resume.Journal | None":
        """Inside an OutputFolder: a journal of finished shards, continued from a dead run's with --resume."""
        owner = active_output(self.folder)
        if owner is None:
            return None
        key = {"metadata": self.metadata, "files": self.files, "groups": self.groups, "inputs": owner.input_states}
        if owner.adopted is None:
            return resume.Journal(key)
        journal = resume.adopt(self.folder, key, owner.adopted, JOURNAL_FILE)
        remove_tree(owner.adopted)  # what was good in it is ours now
        owner.adopted = None
        return journal

    def _skip_done(self) -> None:
        for gi, f in enumerate(self.files):
            if self.journal is not None and f in self.journal.shards:
                rec = self.journal.shards[f]
                self.weight_map.update({n: f for n in self.groups[gi]})
                self.total_size += rec.size - rec.data_start
                self.state.update(rec.state)
        self._order = [(n, gi) for n, gi in self._order if n not in self.done]

    def track_state(self, state: dict) -> None:
        """Save `state[name]` (JSON values) with each finished shard; restore it for skipped ones."""
        state.update(self.state)
        self.state = state

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        expected, group = self._order[self._next]
        assert name == expected, f"writing {name} but the plan expects {expected}"
        if group != self._shard_index:
            self._close_shard()
            self._shard_index = group
            path = self.folder / self.files[group]
            self._shard = SafetensorsShardWriter(path, self.groups[group], self.metadata)
        self._shard.begin(name, dtype, shape)
        self.weight_map[name] = self.files[group]
        self._next += 1

    def write(self, block: torch.Tensor) -> None:
        self._shard.write(block)

    def end(self) -> None:
        self._shard.end()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.begin(name, tensor.dtype, tuple(tensor.shape))
        self.write(tensor)
        self.end()

    def _close_shard(self) -> None:
        if self._shard is not None:
            self.total_size += self._shard.finalize(sync=False)
            record = self._shard.record
            names = self.groups[self._shard_index]
            record.state = json.loads(json.dumps({n: self.state[n] for n in names if n in self.state}))
            self._syncs.append(self._syncer.submit(self._sync_and_record, self._shard.path, record))
            self._shard = None

    def _sync_and_record(self, path: Path, record: "resume.ShardRecord") -> None:
        fsync_path(path)
        if self.journal is not None:  # only once its bytes are on disk
            self.journal.shards[record.file] = record
            self.journal.write(self.folder / JOURNAL_FILE)

    def finalize(self) -> dict[str, str]:
        assert self._next == len(self._order), "not every planned tensor was written"
        self._close_shard()
        self.weight_map = {n: self.weight_map[n] for g in self.groups for n in g}  # plan order, resumed or not
        for done in self._syncs:
            done.result()  # re-raises a failed fsync (e.g. a full disk)
        self._syncer.shutdown()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            with open(self.folder / f"{self.prefix}.safetensors.index.json", "w") as fh:
                json.dump(index, fh, indent=2)
        return self.weight_map

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._syncer.shutdown(wait=True, cancel_futures=True)


class BackgroundWriter:
    """Runs a CheckpointWriter's calls, in order, on one background thread.

    At most one call is in flight: `write(block)` returns once the previous write is
    done, so a caller alternating two output buffers never overwrites one being written.
    """

    def __init__(self, writer: CheckpointWriter):
        self.writer = writer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="write")
        self._last: Future | None = None

    def _submit(self, fn, *args) -> None:
        if self._last is not None:
            self._last.result()  # re-raises a failed write here, in the caller's thread
        self._last = self._pool.submit(fn, *args)

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self._submit(self.writer.begin, name, dtype, shape)

    def write(self, block: torch.Tensor) -> None:
        self._submit(self.writer.write, block)

    def end(self) -> None:
        self._submit(self.writer.end)

    def finalize(self) -> dict[str, str]:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown()
        return self.writer.finalize()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.writer.abort()
