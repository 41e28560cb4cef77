"""A checkpoint: a folder of safetensors shards (or a Hub id), validated once, up front.

Resolves `model.safetensors` or `model.safetensors.index.json` (also PEFT's
`adapter_model.safetensors`), checks that every index entry stays inside the
folder and names a tensor its shard really holds, and serves tensors by name.
Only safetensors are read: pickled `.bin` checkpoints are refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from pathlib import Path

import torch

from .hub import resolve_model_dir
from .jsonfile import load_json_object, optional_json_object
from .quantized import DequantizedCheckpoint, scheme_of
from .safetensors_reader import CheckpointError, SafetensorsFile, TensorInfo

logger = logging.getLogger(__name__)

SINGLE_FILES = ("model.safetensors", "adapter_model.safetensors", "readapter.safetensors")
INDEX_FILES = ("model.safetensors.index.json", "readapter.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


def _shard_name(folder: Path, rel) -> str:
    """`rel` normalized (`./a` -> `a`), refusing names that escape the folder (absolute, `..`).

    The check is on the name, not on where a symlink leads: the Hugging Face cache links every
    snapshot file to its blob store outside the snapshot folder."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{folder}: index entry {rel!r} is not a file name")
    norm = posixpath.normpath(rel)
    if posixpath.isabs(norm) or os.path.isabs(rel) or norm == ".." or norm.startswith("../"):
        raise CheckpointError(f"{folder}: index entry {rel!r} points outside the checkpoint folder")
    return norm


class Checkpoint:
    """All tensors of one checkpoint, by name, across its shards.

    Example:
        >>> ckpt = Checkpoint.open("meta-llama/Llama-3.1-8B", revision="main")
        >>> ckpt.info("model.norm.weight").shape
    """

    def __init__(self, folder: Path, files: dict[str, SafetensorsFile], weight_map: dict[str, str]):
        self.folder = folder
        self.files = files  # shard path relative to the folder -> file
        self.weight_map = weight_map  # tensor name -> shard path relative to the folder, in shard order
        self.source = str(folder)
        self._names: list[str] | None = None
        self._fingerprint: str | None = None

    @classmethod
    def open(cls, path_or_id: str | os.PathLike, *, revision: str | None = None) -> "Checkpoint":
        folder = resolve_model_dir(path_or_id, revision=revision)
        ckpt = cls.from_folder(folder)
        ckpt.source = str(path_or_id)
        return ckpt

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Checkpoint":
        """The folder's tensors; a quantized checkpoint (config.json's quantization_config) is read
        as float32 tensors, its scales folded in (`quantized.DequantizedCheckpoint`)."""
        ckpt = cls._files_of(folder)
        try:
            scheme = scheme_of(ckpt.config, ckpt.source)
        except BaseException:
            ckpt.close()
            raise
        return ckpt if scheme is None else DequantizedCheckpoint(ckpt, scheme)

    @classmethod
    def _files_of(cls, folder: str | os.PathLike) -> "Checkpoint":
        folder = Path(folder)
        index = next((folder / n for n in INDEX_FILES if (folder / n).is_file()), None)
        single = next((folder / n for n in SINGLE_FILES if (folder / n).is_file()), None)
        if single is not None:
            # transformers loads model.safetensors when it exists, whatever index lies beside it.
            if index is not None:
                logger.warning("%s: both %s and %s present; reading %s, as transformers does",
                               folder, single.name, index.name, single.name)
            f = SafetensorsFile(single)
            return cls(folder, {single.name: f}, {name: single.name for name in f.tensors})
        if index is not None:
            return cls._from_index(folder, index)
        return cls._from_loose_files(folder)

    @classmethod
    def _from_index(cls, folder: Path, index: Path) -> "Checkpoint":
        weight_map = load_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files: dict[str, SafetensorsFile] = {}
        shard_of = {}
        for name, rel in weight_map.items():
            rel = shard_of[name] = _shard_name(folder, rel)
            if rel not in files:
                files[rel] = SafetensorsFile(folder / rel)
            if name not in files[rel].tensors:
                raise CheckpointError(f"{folder / rel}: index names tensor {name!r} but the shard lacks it")
        return cls(folder, files, shard_of)

    @classmethod
    def _from_loose_files(cls, folder: Path) -> "Checkpoint":
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such checkpoint folder")
        shards = sorted(folder.glob("*.safetensors"))
        if len(shards) != 1:
            pickled = [n for n in PICKLE_FILES if (folder / n).exists()]
            why = (
                f"only pickled weights ({pickled[0]}); convert them to safetensors first"
                if pickled
                else "no model.safetensors or model.safetensors.index.json"
            )
            raise CheckpointError(f"{folder}: {why}")
        f = SafetensorsFile(shards[0])
        return cls(folder, {shards[0].name: f}, {name: shards[0].name for name in f.tensors})

    # -- queries ---------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Tensor names in storage order (shard file, then offset): reads stay sequential."""
        if self._names is None:
            key = lambda n: (self.weight_map[n], self.info(n).start)
            self._names = sorted(self.weight_map, key=key)
        return self._names

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> SafetensorsFile:
        try:
            return self.files[self.weight_map[name]]
        except KeyError:
            raise CheckpointError(f"{self.source}: no tensor named {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        return self.file_of(name).info(name)

    def read_rows(self, name: str, start: int = 0, stop: int | None = None, *, out=None) -> torch.Tensor:
        return self.file_of(name).read_rows(name, start, stop, out=out)

    def read(self, name: str) -> torch.Tensor:
        return self.file_of(name).read(name)

    def prefetch(self, nbytes: int) -> int:
        """Start reading up to `nbytes` of the shards in storage order into the page cache, in the
        background: a first run derives its role table (transformers' import, seconds of CPU)
        while the disk is already busy with the first reads."""
        asked = 0
        for rel in dict.fromkeys(self.weight_map[n] for n in self.names):
            if asked >= nbytes:
                break
            asked += self.files[rel].prefetch(nbytes - asked)
        return asked

    @property
    def config(self) -> dict:
        return optional_json_object(self.folder / "config.json")

    @property
    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.weight_map)

    def fingerprint(self) -> str:
        """sha256 over each shard's header and a few data samples, in file-name order."""
        if self._fingerprint is None:  # asked for by the base check and by the manifest: read once
            h = hashlib.sha256()
            for name in sorted(self.files):
                h.update(name.encode())
                h.update(self.files[name].fingerprint_part())
            self._fingerprint = "sha256:" + h.hexdigest()
        return self._fingerprint

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


PREFETCH_BYTES = 2 * 2**30  # enough for the first shards while a first run imports transformers


def prefetch_inputs(*ckpts, nbytes: int = PREFETCH_BYTES) -> None:
    """Start the first reads of every input at once (page cache, background), the budget shared
    among them and capped at a quarter of the memory available."""
    ckpts = [c for c in ckpts if c is not None and hasattr(c, "prefetch")]
    if not ckpts:
        return
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = nbytes
    share = min(nbytes, available // 4) // len(ckpts)
    for ckpt in ckpts:
        try:
            ckpt.prefetch(share)
        except OSError:  # a hint only: the reads themselves report real errors
            pass
