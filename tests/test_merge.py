"""`merge` against PEFT's own merge_and_unload and a float64 recomputation, loaded by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import fixtures_models as fm
from stream_readapt import extract, merge

IDS = torch.tensor([[1, 5, 9, 42, 7, 299, 3]])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_matches(out_dir, reference: dict, tol: float) -> None:
    got = fm.load_state_dict(out_dir)
    assert set(got) == set(reference), set(got) ^ set(reference)
    worst = max((rel_err(got[k], reference[k]), k) for k in reference)
    assert worst[0] <= tol, f"tensor {worst[1]}: relative error {worst[0]:.2e} > {tol:.0e}"


@pytest.fixture(params=["lora", "rslora", "dora"])
def knowledge(request):
    return request.getfixturevalue(f"{request.param}_adapter")


def test_alpha1_beta0_equals_peft_merge_and_unload(llama_pair, knowledge, tmp_path):
    merge(llama_pair.base, tmp_path / "out", instruct=llama_pair.instruct, knowledge=knowledge, alpha=1, beta=0, device="cpu")
    assert_matches(tmp_path / "out", fm.peft_merged_state_dict(llama_pair.base, knowledge), 1e-6)


def test_half_half_matches_float64_reference(llama_pair, knowledge, tmp_path):
    merge(llama_pair.base, tmp_path / "out", instruct=llama_pair.instruct, knowledge=knowledge, device="cpu")
    reference = fm.reference_readapt_float64(llama_pair.base, llama_pair.instruct, knowledge, 0.5, 0.5)
    assert_matches(tmp_path / "out", reference, 1e-6)


def test_alpha0_beta1_reproduces_instruct_exactly(llama_pair, llama_pair_bf16, tmp_path):
    for i, pair in enumerate((llama_pair, llama_pair_bf16)):
        merge(pair.base, tmp_path / f"out{i}", instruct=pair.instruct, alpha=0, beta=1, device="cpu")
        got, want = fm.load_state_dict(tmp_path / f"out{i}"), fm.load_state_dict(pair.instruct)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _reference_logits(like_dir, state: dict) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like_dir), dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_transformers_loads_output_with_reference_logits(llama_pair, lora_adapter, tmp_path):
    out = tmp_path / "out"
    manifest = merge(llama_pair.base, out, instruct=llama_pair.instruct, knowledge=lora_adapter, device="cpu")
    reference = fm.reference_readapt_float64(llama_pair.base, llama_pair.instruct, lora_adapter)
    torch.testing.assert_close(fm.logits(out, IDS), _reference_logits(llama_pair.instruct, reference), rtol=1e-4, atol=1e-4)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (llama_pair.instruct / name).read_bytes(), name
    assert json.loads((out / "manifest.json").read_text())["alpha"] == 0.5
    assert manifest["inputs"]["knowledge"]["source"] == str(lora_adapter)


def test_output_keeps_base_shard_layout_or_max_shard_size(llama_pair, tmp_path):
    merge(llama_pair.base, tmp_path / "same", instruct=llama_pair.instruct, device="cpu")
    base_index = json.loads((llama_pair.base / "model.safetensors.index.json").read_text())
    index = json.loads((tmp_path / "same" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    merge(llama_pair.base, tmp_path / "small", instruct=llama_pair.instruct, device="cpu", max_shard_size=100_000)
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3
    sizes = sum((tmp_path / "small" / f).stat().st_size for f in files)
    assert index["metadata"]["total_size"] < sizes  # data bytes only, headers excluded
    with safe_open(tmp_path / "small" / sorted(files)[0], "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["stream_readapt"])["kind"] == "merged"


def test_added_tokens_take_instruct_rows(llama_added_tokens_pair, lora_adapter, tmp_path):
    pair = llama_added_tokens_pair
    out = tmp_path / "out"
    merge(pair.base, out, instruct=pair.instruct, knowledge=lora_adapter, device="cpu")
    reference = fm.reference_readapt_float64(pair.base, pair.instruct, lora_adapter, extra_rows="instruct")
    assert_matches(out, reference, 1e-6)
    got, theta = fm.load_state_dict(out), fm.load_state_dict(pair.instruct)
    assert torch.equal(got["model.embed_tokens.weight"][300:], theta["model.embed_tokens.weight"][300:])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 303
    ids = torch.tensor([[1, 300, 5, 301]])
    assert torch.isfinite(fm.logits(out, ids)).all()


def test_tied_qwen(qwen_tied_pair, qwen_lora_adapter, tmp_path):
    out = tmp_path / "out"
    merge(qwen_tied_pair.base, out, instruct=qwen_tied_pair.instruct, knowledge=qwen_lora_adapter, device="cpu")
    reference = fm.reference_readapt_float64(qwen_tied_pair.base, qwen_tied_pair.instruct, qwen_lora_adapter)
    assert_matches(out, reference, 1e-6)
    assert "lm_head.weight" not in fm.load_state_dict(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    torch.testing.assert_close(fm.logits(out, IDS), _reference_logits(qwen_tied_pair.instruct, reference), rtol=1e-4, atol=1e-4)


def test_tied_base_untied_instruct_gets_own_lm_head(qwen_tied_pair, tmp_path):
    """Base ties lm_head to the embeddings; an untied instruct's lm_head pairs with the base embedding."""
    from safetensors.torch import save_file

    theta = fm.load_state_dict(qwen_tied_pair.instruct)
    theta["lm_head.weight"] = theta["model.embed_tokens.weight"] + 0.01
    untied = tmp_path / "untied"
    untied.mkdir()
    save_file(theta, untied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((qwen_tied_pair.instruct / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    merge(qwen_tied_pair.base, tmp_path / "out", instruct=untied, device="cpu")
    got = fm.load_state_dict(tmp_path / "out")
    phi_embed = fm.load_state_dict(qwen_tied_pair.base)["model.embed_tokens.weight"].double()
    expected = phi_embed + 0.5 * (theta["lm_head.weight"].double() - phi_embed)
    assert rel_err(got["lm_head.weight"], expected) < 1e-6
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_merge_from_full_readapter_equals_merge_from_instruct(llama_pair_bf16, tmp_path):
    pair = llama_pair_bf16
    extract(pair.base, pair.instruct, tmp_path / "re", dtype="float32", device="cpu")
    merge(pair.base, tmp_path / "a", instruct=pair.instruct, device="cpu")
    merge(pair.base, tmp_path / "b", readapter=tmp_path / "re", device="cpu")
    a, b = fm.load_state_dict(tmp_path / "a"), fm.load_state_dict(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == torch.bfloat16
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0), k


def test_row_blocks_do_not_change_the_result(llama_pair, dora_adapter, tmp_path):
    merge(llama_pair.base, tmp_path / "big", instruct=llama_pair.instruct, knowledge=dora_adapter, device="cpu")
    merge(llama_pair.base, tmp_path / "tiny", instruct=llama_pair.instruct, knowledge=dora_adapter, device="cpu", block_bytes=700)
    a, b = fm.load_state_dict(tmp_path / "big"), fm.load_state_dict(tmp_path / "tiny")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_output_dtype_option(llama_pair, tmp_path):
    merge(llama_pair.base, tmp_path / "out", instruct=llama_pair.instruct, dtype="bfloat16", device="cpu")
    got = fm.load_state_dict(tmp_path / "out")
    reference = fm.reference_readapt_float64(llama_pair.base, llama_pair.instruct)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, reference[k].float().to(torch.bfloat16)) or rel_err(v, reference[k]) < 4e-3
