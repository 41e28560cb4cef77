"""Bad input found by an adversarial sweep of the CLI: each gives a one-line error and no output,
and the inputs themselves are never touched. (test_errors.py has the first round.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from stream_readapt import extract, merge
from stream_readapt.io.checkpoint import Checkpoint
from stream_readapt.io.safetensors_reader import CheckpointError, SafetensorsFile
from test_errors import assert_fails, run_cli

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _raw_file(path, header: dict, data: bytes) -> None:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


@pytest.mark.parametrize("header, data, expected", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, bytes(8), "must be integers"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "4 bytes after the last tensor"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "unaccounted bytes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"a": 1}}, bytes(8),
     "__metadata__ must map strings to strings"),
], ids=["float-offset", "trailing-bytes", "hole", "metadata-not-strings"])
def test_reader_is_as_strict_as_the_format(tmp_path, header, data, expected):
    _raw_file(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointError, match=expected):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_duplicate_header_keys_are_refused(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    head = f'{{"w": {entry}, "w": {entry}}}'.encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(4))
    with pytest.raises(CheckpointError, match="duplicate key 'w'"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_index_may_name_subfolders_and_symlinked_blobs(tmp_path):
    """The Hugging Face cache links each snapshot file to a blob outside the snapshot folder:
    a name inside the folder is what counts, not where its link leads."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    (snap / "sub").mkdir(parents=True)
    save_file({"a": torch.arange(4.0)}, blobs / "0123")
    save_file({"b": torch.ones(2, 3)}, snap / "sub" / "part.safetensors")
    os.symlink("../../blobs/0123", snap / "model-1.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-1.safetensors", "b": "./sub/part.safetensors"}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    with Checkpoint.from_folder(snap) as ckpt:
        assert torch.equal(ckpt.read("a"), torch.arange(4.0)) and torch.equal(ckpt.read("b"), torch.ones(2, 3))


@pytest.mark.parametrize("content, expected", [("[1]", "expected a JSON object, found list"),
                                               ('{"a": ', "invalid JSON")])
def test_json_that_is_not_an_object(llama_pair, tmp_path, capsys, content, expected):
    instruct = shutil.copytree(llama_pair.instruct, tmp_path / "instruct")
    (instruct / "config.json").write_text(content)
    out = tmp_path / "out"
    assert_fails(capsys, out, f"config.json: {expected}", "merge", llama_pair.base, "--instruct", instruct, "-o", out)


def _edited_instruct(llama_pair, tmp_path, edit):
    folder = shutil.copytree(llama_pair.instruct, tmp_path / "instruct")
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_integer_weights_are_refused(llama_pair, tmp_path, capsys):
    instruct = _edited_instruct(llama_pair, tmp_path, lambda t: t.update({Q_PROJ: t[Q_PROJ].to(torch.int32)}))
    out = tmp_path / "out"
    assert_fails(capsys, out, f"tensor {Q_PROJ!r} is int32; only floating-point", "merge", llama_pair.base,
                 "--instruct", instruct, "-o", out)


def test_extra_rows_only_on_vocabulary_tensors(llama_pair, tmp_path, capsys):
    grow = lambda t: t.update({Q_PROJ: torch.cat([t[Q_PROJ], t[Q_PROJ][:6]])})  # noqa: E731
    instruct = _edited_instruct(llama_pair, tmp_path, grow)
    out = tmp_path / "out"
    assert_fails(capsys, out, f"tensor {Q_PROJ!r} has shape [70, 64] but the base has [64, 64]",
                 "extract", llama_pair.base, instruct, "-o", out)


@pytest.mark.parametrize("args, expected", [
    (["--alpha", "nan"], "alpha must be a finite number"),
    (["--beta", "inf"], "beta must be a finite number"),
    (["--alpha", "0", "--beta", "1e8", "--dtype", "float16"], "as float16"),  # overflows the output dtype
    (["--device", "meta"], "device meta is not supported"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
])
def test_bad_options(llama_pair, tmp_path, capsys, args, expected):
    out = tmp_path / "out"
    assert_fails(capsys, out, expected, "merge", llama_pair.base, "--instruct", llama_pair.instruct, "-o", out, *args)


@pytest.mark.parametrize("args, expected", [
    (["--include", "("], "--include '(' is not a valid regular expression"),
    (["--exclude", ".*"], "leave none of the"),
    (["--rank", "4", "--exclude", ".*"], "leave none of the"),
    (["--rank", "4", "--seed", str(2**70)], "seed must be in"),
])
def test_bad_extract_options(llama_pair, tmp_path, capsys, args, expected):
    out = tmp_path / "out"
    assert_fails(capsys, out, expected, "extract", llama_pair.base, llama_pair.instruct, "-o", out, *args)


def test_output_never_replaces_an_input(llama_pair, tmp_path, capsys):
    base = shutil.copytree(llama_pair.base, tmp_path / "models" / "base")
    before = sorted(p.name for p in base.iterdir())
    for out in (base, base.parent, tmp_path):  # the input itself, or a folder holding it
        code, err = run_cli(capsys, "merge", base, "--instruct", llama_pair.instruct, "-o", out, "--overwrite")
        assert code != 0 and "would replace the input" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in base.iterdir()) == before
    link = tmp_path / "link"
    link.symlink_to(base)
    code, err = run_cli(capsys, "merge", base, "--instruct", llama_pair.instruct, "-o", link, "--overwrite")
    assert code != 0 and "would replace the input" in err


def test_overwriting_a_link_replaces_the_link_only(llama_pair, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(target)
    code, err = run_cli(capsys, "merge", llama_pair.base, "--instruct", llama_pair.instruct, "-o", link, "--overwrite")
    assert code == 0, err
    assert (link / "config.json").is_file() and not link.is_symlink()
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]  # no .out.old-PID left


def test_usage_errors_are_one_line(capsys):
    code, err = run_cli(capsys, "merge")
    assert code == 2 and len(err.splitlines()) == 1 and "(see --help)" in err


def test_readapter_without_manifest_warns(llama_pair, tmp_path, caplog):
    extract(llama_pair.base, llama_pair.instruct, tmp_path / "lore", rank=4, device="cpu")
    (tmp_path / "lore" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        merge(llama_pair.base, tmp_path / "out", readapter=tmp_path / "lore", device="cpu")
    assert "no base fingerprint recorded" in caplog.text


def test_tie_flag_must_be_a_bool(llama_pair, tmp_path, capsys):
    instruct = shutil.copytree(llama_pair.instruct, tmp_path / "instruct")
    config = json.loads((instruct / "config.json").read_text())
    (instruct / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": "false"}))
    out = tmp_path / "out"
    assert_fails(capsys, out, "tie_word_embeddings must be true or false, got 'false'", "merge", llama_pair.base,
                 "--instruct", instruct, "-o", out)


def _with_odd_tensors(src, dst, scalar: float):
    """A copy of checkpoint `src` holding two legal odd tensors: a 0-dim scalar (xIELU's `beta`)
    and a zero-row matrix."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    first = sorted(dst.glob("*.safetensors"))[0]
    tensors = load_file(first)
    tensors["model.act_beta"] = torch.tensor(scalar)
    tensors["model.no_rows"] = torch.zeros(0, 4)
    save_file(tensors, first, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({"model.act_beta": first.name, "model.no_rows": first.name})
        index.write_text(json.dumps(data))
    return dst


def test_zero_dim_and_zero_row_tensors_go_through_every_streaming_path(llama_pair, tmp_path):
    """Legal odd tensors are merged and extracted like any other (once an AssertionError)."""
    from safetensors.torch import load_file

    from stream_readapt import extract, merge

    base = _with_odd_tensors(llama_pair.base, tmp_path / "base", 0.5)
    instruct = _with_odd_tensors(llama_pair.instruct, tmp_path / "instruct", 0.75)

    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    extract(base, instruct, tmp_path / "full")
    merge(base, tmp_path / "m1", instruct=instruct, alpha=0.5, beta=0.5)
    merge(base, tmp_path / "m2", readapter=tmp_path / "full", alpha=0.5, beta=0.5)
    assert tensors(tmp_path / "full")["model.act_beta"].item() == 0.25
    for out in ("m1", "m2"):
        got = tensors(tmp_path / out)
        assert got["model.act_beta"].shape == () and got["model.act_beta"].item() == 0.625
        assert got["model.no_rows"].shape == (0, 4)


def test_a_fifo_where_config_json_should_be_is_refused_not_waited_on(llama_pair, tmp_path):
    """A FIFO config.json once hung every run (and was blamed on the LoRA): one line, at once."""
    import os
    import shutil
    import subprocess
    import sys

    base = tmp_path / "base"
    shutil.copytree(llama_pair.base, base)
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    done = subprocess.run([sys.executable, "-m", "stream_readapt", "merge", str(base), "--instruct",
                           str(llama_pair.instruct), "-o", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json: not a regular file" in lines[0], done.stderr
