"""The safetensors reader / streaming writer / output folder, against the safetensors library."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stream_readapt.io.checkpoint import Checkpoint
from stream_readapt.io.safetensors_reader import CheckpointError, SafetensorsFile
from stream_readapt.io.writer import (
    CheckpointWriter, OutputFolder, PlannedTensor, SafetensorsShardWriter, shard_file_names, shards_by_size, shards_like,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


def _sample(dtype: torch.dtype, shape=(5, 3)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(0, 100, shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_every_dtype(tmp_path, dtype):
    t = _sample(dtype, (7, 3))
    with SafetensorsShardWriter(tmp_path / "x.safetensors", ["t"], {"format": "pt"}) as w:
        w.begin("t", t.dtype, tuple(t.shape))
        w.write(t[:2])
        w.write(t[2:])
        w.end()
    assert torch.equal(load_file(tmp_path / "x.safetensors")["t"], t)
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert torch.equal(f.read_rows("t", 3, 6), t[3:6])


def test_tiny_tensor_exact_bytes(tmp_path):
    """Header JSON and data bytes exactly as the format defines them."""
    t = torch.tensor([[1.0, -2.0]], dtype=torch.float32)
    path = tmp_path / "x.safetensors"
    with SafetensorsShardWriter(path, ["a"], {"format": "pt"}) as w:
        w.add("a", t)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header == {"a": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}, "__metadata__": {"format": "pt"}}
    assert raw[8 + n :] == struct.pack("<2f", 1.0, -2.0)


def test_reader_matches_safetensors_library(tmp_path):
    tensors = {"w": torch.randn(9, 4), "b": torch.randn(4).half(), "s": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "ref.safetensors")
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        for name, t in tensors.items():
            assert torch.equal(f.read(name), t)
        assert torch.equal(f.read_rows("w", 2, 5), tensors["w"][2:5])
        assert torch.equal(f.read_rows("w", 8, 100), tensors["w"][8:])


def test_checkpoint_writer_shards_and_index(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10) for i in range(5)}
    plan = [PlannedTensor(n, 400) for n in tensors]
    groups = shards_by_size(plan, 900)
    assert [len(g) for g in groups] == [2, 2, 1]
    writer = CheckpointWriter(tmp_path, groups, metadata={"format": "pt"})
    for n, t in tensors.items():
        writer.add(n, t)
    writer.finalize()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert set(index["weight_map"].values()) == set(shard_file_names("model", 3))
    with Checkpoint.from_folder(tmp_path) as ckpt:
        for n, t in tensors.items():
            assert torch.equal(ckpt.read(n), t)
    with safe_open(tmp_path / "model-00001-of-00003.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_shards_like_keeps_reference_layout():
    plan = [PlannedTensor(n, 1) for n in ("a", "b", "lm_head", "c")]
    groups = shards_like(plan, {"a": "s1", "b": "s2", "c": "s2"})
    assert groups == [["a"], ["b", "lm_head", "c"]]


def test_writer_refuses_wrong_sizes(tmp_path):
    w = SafetensorsShardWriter(tmp_path / "x.safetensors", ["t"])
    w.begin("t", torch.float32, (2, 2))
    w.write(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="bytes short"):
        w.end()
    with pytest.raises(ValueError, match="more bytes"):
        w.write(torch.zeros(3, 2))
    w.close()


def test_output_folder_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputFolder(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    with OutputFolder(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="not empty"):
        OutputFolder(out)
    with OutputFolder(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]


def test_truncated_and_corrupt_files(tmp_path):
    save_file({"w": torch.randn(8, 8)}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "trunc.safetensors")
    (tmp_path / "short.safetensors").write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "short.safetensors")
    bad = bytearray(raw)
    bad[9] = ord("#")
    (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupt"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_index_escaping_folder_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"w": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Checkpoint.from_folder(folder)


def test_pickles_are_never_loaded(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="only pickled weights"):
        Checkpoint.from_folder(tmp_path)


def _fake_hub_cache(root, repo_id: str, commit: str = "a" * 40):
    """The huggingface_hub cache layout for one snapshot (what an earlier download leaves)."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, snap / "model.safetensors")
    (snap / "config.json").write_text("{}")


def _open_in_subprocess(hf_home, target: str):
    import os
    import subprocess
    import sys

    code = f"from stream_readapt.io.checkpoint import Checkpoint; c = Checkpoint.open({target!r}, revision='main'); print(c.names)"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_resolves_from_cache_offline(tmp_path):
    _fake_hub_cache(tmp_path / "hf", "tiny-org/tiny-model")
    done = _open_in_subprocess(tmp_path / "hf", "tiny-org/tiny-model")
    assert done.returncode == 0, done.stderr
    assert "['w']" in done.stdout
    missing = _open_in_subprocess(tmp_path / "hf", "tiny-org/other-model")
    assert missing.returncode != 0
    assert "tiny-org/other-model: not a local folder, and not in the Hub cache" in missing.stderr


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Checkpoint.open(tmp_path / "missing" / "folder")


def test_fingerprint_tells_same_layout_checkpoints_apart(llama_pair, tmp_path):
    """A fine-tune has the base's exact headers; the fingerprint must still differ."""
    import fixtures_models as fm

    theta = fm.load_state_dict(llama_pair.instruct)
    twin = tmp_path / "twin"
    twin.mkdir()
    for shard in sorted(llama_pair.base.glob("*.safetensors")):
        keys = list(load_file(shard))
        save_file({k: theta[k] for k in keys}, twin / shard.name, metadata={"format": "pt"})
        assert SafetensorsFile(twin / shard.name).header_bytes == SafetensorsFile(shard).header_bytes
    (twin / "model.safetensors.index.json").write_bytes((llama_pair.base / "model.safetensors.index.json").read_bytes())
    with Checkpoint.from_folder(llama_pair.base) as a, Checkpoint.from_folder(twin) as b:
        assert a.fingerprint() != b.fingerprint()
    with Checkpoint.from_folder(llama_pair.base) as a, Checkpoint.from_folder(llama_pair.base) as b:
        assert a.fingerprint() == b.fingerprint()


def test_prefetch_asks_for_the_first_shards_in_storage_order_within_budget(llama_pair):
    """The read-ahead hint covers the shards the stream reads first, and never more than asked."""
    with Checkpoint.from_folder(llama_pair.base) as ckpt:
        order = list(dict.fromkeys(ckpt.weight_map[n] for n in ckpt.names))
        sizes = [(ckpt.folder / rel).stat().st_size for rel in order]
        assert len(sizes) > 1
        assert ckpt.prefetch(sizes[0] + 10) == sizes[0] + 10
        assert ckpt.prefetch(10**15) == sum(sizes)
        assert ckpt.prefetch(0) == 0
