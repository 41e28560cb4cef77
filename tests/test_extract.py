"""`extract` (full RE-Adapter): Δ = Θ − Φ against a float64 computation, dtypes, vocab, selection."""

from __future__ import annotations

import json
import math

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fixtures_models as fm
from stream_readapt import extract
from stream_readapt.checkpoint import Checkpoint


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


def test_float32_delta_reproduces_bf16_instruct_bit_for_bit(llama_pair_bf16, tmp_path):
    pair = llama_pair_bf16
    extract(pair.base, pair.instruct, tmp_path / "re", dtype="float32", device="cpu")
    phi, theta = fm.load_state_dict(pair.base), fm.load_state_dict(pair.instruct)
    delta = load_readapter(tmp_path / "re")
    for k in theta:
        assert delta[k].dtype == torch.float32
        assert torch.equal((phi[k].float() + delta[k]).to(torch.bfloat16), theta[k]), k


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
