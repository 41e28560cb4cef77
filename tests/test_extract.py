"""`extract` (full RE-Adapter): Δ = Θ − Φ against a float64 computation, dtypes, vocab, selection."""

from __future__ import annotations

import json
import math
import shutil

import pytest

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fixtures_models as fm
from stream_readapt import extract
from stream_readapt.io.checkpoint import Checkpoint


def load_readapter(folder) -> dict[str, torch.Tensor]:
    """Every tensor of every `readapter*.safetensors` shard, read by the safetensors library."""
    out = {}
    for shard in sorted(folder.glob("readapter*.safetensors")):
        out.update(load_file(shard))
    return out


def test_delta_and_norms_match_float64(llama_pair, tmp_path):
    manifest = extract(llama_pair.base, llama_pair.instruct, tmp_path / "re", device="cpu")
    phi, theta = fm.load_state_dict(llama_pair.base), fm.load_state_dict(llama_pair.instruct)
    delta = load_readapter(tmp_path / "re")
    assert set(delta) == set(theta)
    for k in theta:
        exact = theta[k].double() - phi[k].double()
        assert delta[k].dtype == torch.float32
        torch.testing.assert_close(delta[k].double(), exact, rtol=0, atol=1e-7)
        stats = manifest["tensors"][k]
        assert math.isclose(stats["norm"], float(exact.norm()), rel_tol=1e-6)
        assert math.isclose(stats["rel_norm"], float(exact.norm() / phi[k].double().norm()), rel_tol=1e-6)


@pytest.fixture(scope="module")
def bf16_pair_far_exponents(llama_pair_bf16, tmp_path_factory):
    """The bf16 pair with one weight moved from 0.033 to 3.3e-7: Θ − Φ then needs more than
    float32's 24 bits (the case a fresh clone met with transformers 5.24)."""
    root = tmp_path_factory.mktemp("far_exponents")
    instruct = root / "instruct"
    shutil.copytree(llama_pair_bf16.instruct, instruct)
    name = "model.layers.1.mlp.up_proj.weight"
    theta = load_file(instruct / "model.safetensors")
    phi = fm.load_state_dict(llama_pair_bf16.base)
    theta[name] = theta[name].clone()
    theta[name][0, 0] = 3.33e-7
    phi_value = float(phi[name][0, 0].float())
    assert abs(phi_value) > 1e-3, "the planted element needs a base weight far above 3.3e-7"
    save_file(theta, instruct / "model.safetensors", metadata={"format": "pt"})
    return fm.ModelPair(llama_pair_bf16.base, instruct)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stored_delta_is_exact_where_its_dtype_holds_it(bf16_pair_far_exponents, tmp_path, dtype):
    """Φ + Δ reproduces a bf16 Θ bit for bit wherever Δ is exact, and the manifest counts
    exactly the elements where it is not (float64: none)."""
    pair = bf16_pair_far_exponents
    manifest = extract(pair.base, pair.instruct, tmp_path / "re", dtype=dtype, device="cpu")
    phi, theta = fm.load_state_dict(pair.base), fm.load_state_dict(pair.instruct)
    delta = load_readapter(tmp_path / "re")
    total = 0
    for k in theta:
        exact = theta[k].double() - phi[k].double()  # bf16 differences fit float64's 53 bits
        inexact = delta[k].double() != exact
        assert manifest["tensors"][k]["inexact"] == int(inexact.sum()), k
        rebuilt = (phi[k].double() + delta[k].double()).to(torch.bfloat16)
        assert torch.equal(rebuilt[~inexact], theta[k][~inexact]), k
        total += int(inexact.sum())
    assert manifest["inexact_elements"] == total
    assert (total == 0) if dtype == "float64" else (total >= 1)


def test_default_dtype_is_the_inputs(llama_pair_bf16, tmp_path):
    extract(llama_pair_bf16.base, llama_pair_bf16.instruct, tmp_path / "re", device="cpu")
    assert {t.dtype for t in load_readapter(tmp_path / "re").values()} == {torch.bfloat16}


def test_layout_manifest_and_side_files(llama_pair, tmp_path):
    out = tmp_path / "re"
    extract(llama_pair.base, llama_pair.instruct, out, device="cpu")
    index = json.loads((out / "readapter.safetensors.index.json").read_text())
    base_index = json.loads((llama_pair.base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(set(base_index["weight_map"].values()))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "readapter"
    with Checkpoint.open(llama_pair.base) as base:
        assert manifest["inputs"]["base"]["fingerprint"] == base.fingerprint()
    with safe_open(out / sorted(set(index["weight_map"].values()))[0], "pt") as f:
        head = json.loads(f.metadata()["stream_readapt"])
    assert head["inputs"] == manifest["inputs"] and "tensors" not in head
    assert (out / "tokenizer_config.json").read_bytes() == (llama_pair.instruct / "tokenizer_config.json").read_bytes()


def test_added_rows_are_instruct_rows(llama_added_tokens_pair, tmp_path):
    pair = llama_added_tokens_pair
    manifest = extract(pair.base, pair.instruct, tmp_path / "re", device="cpu")
    assert manifest["added_rows"] == {"model.embed_tokens.weight": [300, 303], "lm_head.weight": [300, 303]}
    delta, theta = load_readapter(tmp_path / "re"), fm.load_state_dict(pair.instruct)
    for k in manifest["added_rows"]:
        assert delta[k].shape[0] == 303
        assert torch.equal(delta[k][300:], theta[k][300:])


def test_include_exclude(llama_pair, tmp_path):
    manifest = extract(
        llama_pair.base, llama_pair.instruct, tmp_path / "re", device="cpu",
        include=[r"layers\.0\."], exclude=[r"mlp"],
    )
    names = set(load_readapter(tmp_path / "re"))
    assert names and all("layers.0." in n and "mlp" not in n for n in names)
    assert "model.norm.weight" in manifest["excluded"]


def test_tied_base_and_instruct(qwen_tied_pair, tmp_path):
    manifest = extract(qwen_tied_pair.base, qwen_tied_pair.instruct, tmp_path / "re", device="cpu")
    delta = load_readapter(tmp_path / "re")
    assert "lm_head.weight" not in delta and manifest["base_only"] == []
    phi, theta = fm.load_state_dict(qwen_tied_pair.base), fm.load_state_dict(qwen_tied_pair.instruct)
    bias = "model.layers.0.self_attn.q_proj.bias"
    torch.testing.assert_close(delta[bias], theta[bias] - phi[bias], rtol=0, atol=0)
