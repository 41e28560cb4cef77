"""The writer's finalize invariant: unique names whose bytes tile the data section exactly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stream_readapt.io.writer import CheckpointWriter, OutputFolder, SafetensorsShardWriter, check_layout


def test_duplicate_name_refused_and_nothing_left(tmp_path):
    path = tmp_path / "x.safetensors"
    w = SafetensorsShardWriter(path, ["a", "a"], {"format": "pt"})
    w.add("a", torch.zeros(3, 2))
    w.add("a", torch.ones(3, 2))
    with pytest.raises(ValueError, match="'a' written twice"):
        w.finalize()
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial sibling


def test_clean_file_is_renamed_into_place(tmp_path):
    path = tmp_path / "x.safetensors"
    w = SafetensorsShardWriter(path, ["a", "b"], {"format": "pt"})
    w.add("a", torch.zeros(3, 2))
    assert not path.exists()  # only a finished file carries the name
    w.add("b", torch.ones(5))
    w.finalize()
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    assert torch.equal(load_file(path)["b"], torch.ones(5))


def test_abandoned_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with SafetensorsShardWriter(tmp_path / "x.safetensors", ["a"]) as w:
            w.add("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _entry(start, stop):
    return {"dtype": "F32", "shape": [(stop - start) // 4], "data_offsets": [start, stop]}


@pytest.mark.parametrize("entries, total, message", [
    ({"a": _entry(0, 8), "b": _entry(16, 24)}, 24, "hole of 8 bytes before tensor 'b'"),
    ({"a": _entry(0, 8), "b": _entry(4, 12)}, 12, "overlap of 4 bytes before tensor 'b'"),
    ({"a": _entry(0, 8)}, 20, "12 bytes after the last tensor"),
])
def test_check_layout_refuses_holes_and_overlaps(entries, total, message):
    with pytest.raises(ValueError, match=message):
        check_layout(Path("f.safetensors"), list(entries), entries, total)
    check_layout(Path("f.safetensors"), ["a"], {"a": _entry(0, 8)}, 8)  # a clean layout passes


def test_checkpoint_writer_duplicate_plan_fails_the_output(tmp_path):
    """A plan naming a tensor twice (the gpt-oss bug) makes the whole output fail, not exit 0."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="written twice"):
        with OutputFolder(out) as tmp:
            writer = CheckpointWriter(tmp, [["a", "a"]])
            writer.add("a", torch.zeros(2))
            writer.add("a", torch.zeros(2))
            writer.finalize()
    assert not out.exists() and list(tmp_path.iterdir()) == []
