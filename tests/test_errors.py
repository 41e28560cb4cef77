"""Bad input: a one-line error naming the file/tensor, a non-zero exit, no finished-looking output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures_models as fm
from stream_readapt.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args] + ["--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_fails(capsys, out, expected: str, *args) -> None:
    code, err = run_cli(capsys, *args)
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not out.exists(), "a failed run left an output folder behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("truncate", "truncated"),
        ("bad_header", "corrupt safetensors header"),
        ("escape_index", "points outside the checkpoint folder"),
        ("missing_tensor", "the shard lacks it"),
        ("bin_only", "only pickled weights"),
    ],
)
def test_corrupt_base(llama_pair, tmp_path, capsys, mode, expected):
    broken = fm.corrupt_copy(llama_pair.base, tmp_path / "broken", mode)
    out = tmp_path / "out"
    assert_fails(capsys, out, expected, "merge", broken.dir, "--instruct", llama_pair.instruct, "-o", out)


def test_nan_is_refused(llama_pair, tmp_path, capsys):
    broken = fm.corrupt_copy(llama_pair.instruct, tmp_path / "nan", "nan")
    out = tmp_path / "out"
    assert_fails(capsys, out, f"NaN/Inf produced in tensor {broken.key!r}", "merge", llama_pair.base, "--instruct", broken.dir, "-o", out)
    assert_fails(capsys, out, f"NaN/Inf produced in tensor {broken.key!r}", "extract", llama_pair.base, broken.dir, "-o", out)


def test_other_architecture(llama_pair, qwen_tied_pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert_fails(capsys, out, "the instruct model is model_type='qwen2'", "extract", llama_pair.base, qwen_tied_pair.instruct, "-o", out)


def _rewrite_single(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_shape_mismatch_and_missing_tensor(llama_pair, tmp_path, capsys):
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite_single(llama_pair.instruct, tmp_path / "shape", lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    out = tmp_path / "out"
    assert_fails(capsys, out, f"tensor {key!r} has shape [176, 63] but the base has [176, 64]", "merge", llama_pair.base, "--instruct", tmp_path / "shape", "-o", out)
    _rewrite_single(llama_pair.instruct, tmp_path / "missing", lambda t: t.pop(key))
    assert_fails(capsys, out, f"tensor {key!r} of the base is missing here", "merge", llama_pair.base, "--instruct", tmp_path / "missing", "-o", out)


def _edit_adapter(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})


def test_adapter_for_another_base(llama_pair, lora_adapter, tmp_path, capsys):
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"

    def move(t):
        t[prefix.replace("layers.0", "layers.7") + ".lora_A.weight"] = t.pop(prefix + ".lora_A.weight")
        t[prefix.replace("layers.0", "layers.7") + ".lora_B.weight"] = t.pop(prefix + ".lora_B.weight")

    _edit_adapter(lora_adapter, tmp_path / "moved", move)
    out = tmp_path / "out"
    args = ("merge", llama_pair.base, "--instruct", llama_pair.instruct, "-o", out, "--knowledge")
    assert_fails(capsys, out, "target module 'model.layers.7.self_attn.q_proj' does not exist in the base", *args, tmp_path / "moved")

    def widen(t):
        t[prefix + ".lora_A.weight"] = torch.zeros(8, 96)

    _edit_adapter(lora_adapter, tmp_path / "wide", widen)
    assert_fails(capsys, out, "adapter made for another base", *args, tmp_path / "wide")


def test_readapter_from_another_base(llama_pair, llama_pair_bf16, tmp_path, capsys):
    code, _ = run_cli(capsys, "extract", llama_pair.base, llama_pair.instruct, "-o", tmp_path / "re")
    assert code == 0
    out = tmp_path / "out"
    assert_fails(capsys, out, "RE-Adapter was extracted from another base", "merge", llama_pair_bf16.base, "--readapter", tmp_path / "re", "-o", out)
    code, _ = run_cli(capsys, "merge", llama_pair_bf16.base, "--readapter", tmp_path / "re", "-o", out, "--ignore-base-mismatch")
    assert code == 0 and (out / "config.json").exists()


def test_existing_output_needs_overwrite(llama_pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "merge", llama_pair.base, "--instruct", llama_pair.instruct, "-o", out)
    assert code != 0 and "--overwrite" in err and (out / "keep.txt").exists()
    code, _ = run_cli(capsys, "merge", llama_pair.base, "--instruct", llama_pair.instruct, "-o", out, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_full_disk_leaves_nothing(llama_pair, tmp_path):
    """A write that fails mid-way (file size limit standing in for a full disk)."""
    out = tmp_path / "out"
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000));"
        "from stream_readapt.cli import main;"
        f"sys.exit(main(['merge', {str(llama_pair.base)!r}, '--instruct', {str(llama_pair.instruct)!r}, '-o', {str(out)!r}, '--quiet']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "File too large" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_json_and_inspect(llama_pair, lora_adapter, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(llama_pair.base), "--instruct", str(llama_pair.instruct), "--knowledge", str(lora_adapter), "-o", str(out), "--json", "--quiet"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["kind"] == "merged" and manifest["alpha"] == 0.5 and len(manifest["tensors"]) == 21
    assert main(["inspect", str(out), str(lora_adapter), "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert items[0]["kind"] == "merged" and items[0]["tensors"] == 21
    assert items[1]["adapter"]["modules"] == 14 and items[1]["adapter"]["rank_max"] == 8
    assert main(["inspect", str(out)]) == 0
    assert "merged, 21 tensors" in capsys.readouterr().out


def test_demo_runs_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "stream_readapt.cli", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "demo passed" in done.stdout and "base + Δ == instruct: True" in done.stdout
