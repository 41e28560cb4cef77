"""Sanity checks of the test fixtures themselves (and of the PEFT semantics they encode)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import fixtures_models as fm

pytest.importorskip("transformers")
pytest.importorskip("peft")

ADAPTERS = ["lora_adapter", "rslora_adapter", "dora_adapter", "qwen_lora_adapter"]
PREFIX = "base_model.model."


def _base_of(request, adapter_name: str):
    pair = "qwen_tied_pair" if adapter_name.startswith("qwen") else "llama_pair"
    return request.getfixturevalue(pair).base


def test_llama_pair_files(llama_pair):
    index = json.loads((llama_pair.base / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((llama_pair.base / s).exists() for s in shards)
    tensors = fm.load_state_dict(llama_pair.base)
    assert set(index["weight_map"]) == set(tensors) and "lm_head.weight" in tensors
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert (llama_pair.instruct / "model.safetensors").exists()
    assert not (llama_pair.instruct / "model.safetensors.index.json").exists()


def test_llama_pair_tokenizer_and_generation_config(llama_pair):
    from transformers import AutoTokenizer, GenerationConfig

    base_tok = AutoTokenizer.from_pretrained(llama_pair.base)
    tok = AutoTokenizer.from_pretrained(llama_pair.instruct)
    assert base_tok.chat_template is None and tok.chat_template == fm.CHAT_TEMPLATE
    assert len(tok) == fm.VOCAB and tok.eos_token_id == 2 and tok.pad_token_id == 3
    ids = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=True)
    assert ids["input_ids"] == [1, 5, 8, 9, 2]  # <s> user w1 w2 </s>
    base_gen = GenerationConfig.from_pretrained(llama_pair.base)
    gen = GenerationConfig.from_pretrained(llama_pair.instruct)
    assert gen.temperature == 0.7 and gen.do_sample and not base_gen.do_sample


@pytest.mark.parametrize("pair", ["llama_pair", "qwen_tied_pair", "llama_pair_bf16"])
def test_instruct_differs_in_every_tensor(request, pair):
    pair = request.getfixturevalue(pair)
    base, inst = fm.load_state_dict(pair.base), fm.load_state_dict(pair.instruct)
    assert base.keys() == inst.keys()
    assert all(not torch.equal(base[k], inst[k]) for k in base)


def test_qwen_tied_has_no_lm_head(qwen_tied_pair):
    for folder in (qwen_tied_pair.base, qwen_tied_pair.instruct):
        keys = fm.checkpoint_keys(folder)
        assert "lm_head.weight" not in keys and "model.layers.0.self_attn.q_proj.bias" in keys
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True


def test_added_tokens_rows(llama_added_tokens_pair):
    from transformers import AutoTokenizer

    inst = fm.load_state_dict(llama_added_tokens_pair.instruct)
    base = fm.load_state_dict(llama_added_tokens_pair.base)
    n = fm.VOCAB + len(fm.ADDED_TOKENS)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert inst[key].shape == (n, 64) and base[key].shape == (fm.VOCAB, 64)
        assert (inst[key][fm.VOCAB:].norm(dim=1) > 0.05).all()
    tok = AutoTokenizer.from_pretrained(llama_added_tokens_pair.instruct)
    assert tok.convert_tokens_to_ids(list(fm.ADDED_TOKENS)) == [300, 301, 302]
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template


def test_bf16_pair_dtype(llama_pair_bf16):
    assert len(fm.checkpoint_files(llama_pair_bf16.base)) >= 2
    for folder in (llama_pair_bf16.base, llama_pair_bf16.instruct):
        assert {t.dtype for t in fm.load_state_dict(folder).values()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_loads_and_is_nonzero(request, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(name)
    tensors = load_file(folder / "adapter_model.safetensors")
    assert all(k.startswith(PREFIX) for k in tensors)
    assert any(".lora_B.weight" in k for k in tensors)
    assert all(t.count_nonzero() == t.numel() for k, t in tensors.items() if ".lora_" in k)
    base = AutoModelForCausalLM.from_pretrained(_base_of(request, name), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(folder))


def test_rslora_layout(rslora_adapter, llama_pair):
    t = load_file(rslora_adapter / "adapter_model.safetensors")
    layer = PREFIX + "model.layers.{}.{}.lora_A.weight"
    assert t[layer.format(0, "self_attn.q_proj")].shape[0] == 4
    assert t[layer.format(1, "mlp.down_proj")].shape[0] == 12
    assert t[layer.format(0, "mlp.down_proj")].shape[0] == 8
    assert t[PREFIX + "model.embed_tokens.lora_embedding_A"].shape == (8, fm.VOCAB)
    assert t[PREFIX + "model.embed_tokens.lora_embedding_B"].shape == (64, 8)
    base = fm.load_state_dict(llama_pair.base)
    assert not torch.equal(t[PREFIX + "lm_head.weight"], base["lm_head.weight"])
    # PEFT also stores the (unchanged) base embedding when embed_tokens is a target
    assert torch.equal(t[PREFIX + "model.embed_tokens.base_layer.weight"],
                       base["model.embed_tokens.weight"])


def test_dora_magnitude_differs_from_base_norms(dora_adapter, llama_pair):
    base = fm.load_state_dict(llama_pair.base)
    mags = {k: v for k, v in load_file(dora_adapter / "adapter_model.safetensors").items()
            if k.endswith(".lora_magnitude_vector")}
    assert len(mags) == 8
    for key, m in mags.items():
        w = base[key[len(PREFIX):].replace("lora_magnitude_vector", "weight")]
        assert m.shape == (w.shape[0],) and (m - w.norm(dim=1)).abs().max() > 1e-3


def _pattern(patterns: dict, module: str, default):
    return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", module)), default)


def _design_merge(base: dict, adapter_dir) -> dict:
    """Ω for α=1, β=0 by the formulas of design.md, in float64."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ad = {k: v.double() for k, v in fm.load_state_dict(adapter_dir).items()}
    out = {}
    for key, w in base.items():
        w, (mod, leaf) = w.double(), (PREFIX + key).rsplit(".", 1)
        if leaf != "weight":
            out[key] = w
            continue
        r = _pattern(cfg["rank_pattern"], mod, cfg["r"])
        s = _pattern(cfg["alpha_pattern"], mod, cfg["lora_alpha"])
        s /= math.sqrt(r) if cfg["use_rslora"] else r
        if mod + ".lora_A.weight" in ad:
            w = w + s * ad[mod + ".lora_B.weight"] @ ad[mod + ".lora_A.weight"]
        if mod + ".lora_embedding_A" in ad:
            w = w + s * (ad[mod + ".lora_embedding_B"] @ ad[mod + ".lora_embedding_A"]).T
        if mod + ".lora_magnitude_vector" in ad:
            w = (ad[mod + ".lora_magnitude_vector"] / w.norm(dim=1))[:, None] * w
        out[key] = ad.get(PREFIX + key, w)
    return out


@pytest.mark.parametrize("name", ADAPTERS)
def test_design_formulas_match_peft_merge(request, name):
    adapter, base_dir = request.getfixturevalue(name), _base_of(request, name)
    peft64 = fm.peft_merged_state_dict(base_dir, adapter, dtype=torch.float64)
    ours = _design_merge(fm.load_state_dict(base_dir), adapter)
    assert peft64.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], peft64[key], atol=1e-12, rtol=0, msg=key)
    peft32 = fm.peft_merged_state_dict(base_dir, adapter)
    assert all(v.dtype == torch.float32 for v in peft32.values())
    assert max((peft32[k].double() - peft64[k]).abs().max() for k in ours) < 1e-5


def test_reference_readapt_endpoints(llama_pair, lora_adapter):
    base, inst = fm.load_state_dict(llama_pair.base), fm.load_state_dict(llama_pair.instruct)
    only_delta = fm.reference_readapt_float64(llama_pair.base, llama_pair.instruct, None, 0.0, 1.0)
    half = fm.reference_readapt_float64(llama_pair.base, llama_pair.instruct, lora_adapter)
    merged = fm.peft_merged_state_dict(llama_pair.base, lora_adapter, dtype=torch.float64)
    for k in base:
        assert only_delta[k].dtype == torch.float64
        torch.testing.assert_close(only_delta[k], inst[k].double(), atol=1e-7, rtol=0)
        expect = (merged[k] + inst[k].double()) / 2
        torch.testing.assert_close(half[k], expect, atol=1e-12, rtol=1e-12)


def test_reference_readapt_added_rows(llama_added_tokens_pair):
    pair = llama_added_tokens_pair
    with pytest.raises(ValueError, match="embed_tokens"):
        fm.reference_readapt_float64(pair.base, pair.instruct, None)
    out = fm.reference_readapt_float64(pair.base, pair.instruct, None, extra_rows="instruct")
    inst = fm.load_state_dict(pair.instruct)["lm_head.weight"]
    assert out["lm_head.weight"].shape == inst.shape
    assert torch.equal(out["lm_head.weight"][fm.VOCAB:], inst[fm.VOCAB:].double())


def test_logits(qwen_tied_pair):
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    base, inst = fm.logits(qwen_tied_pair.base, ids), fm.logits(qwen_tied_pair.instruct, ids)
    assert base.shape == (1, 5, fm.VOCAB) and base.dtype == torch.float32
    assert not torch.allclose(base, inst)


@pytest.mark.parametrize("mode", fm.CORRUPT_MODES)
def test_corrupt_copy(llama_pair, tmp_path, mode):
    bad = fm.corrupt_copy(llama_pair.base, tmp_path / "bad", mode)
    path = bad.dir / bad.file
    if mode in ("truncate", "bad_header"):
        with pytest.raises(Exception):
            load_file(path)
    elif mode == "escape_index":
        assert json.loads(path.read_text())["weight_map"][bad.key] == "../evil.safetensors"
    elif mode == "nan":
        assert load_file(path)[bad.key].isnan().sum() == 1
    elif mode == "missing_tensor":
        assert bad.key not in load_file(path) and bad.key in fm.checkpoint_keys(llama_pair.base)
    else:
        assert path.exists() and not list(bad.dir.glob("*.safetensors*"))
        assert (bad.dir / "config.json").exists()
