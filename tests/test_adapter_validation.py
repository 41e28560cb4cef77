"""A knowledge adapter whose config or tensors are broken or disagree: one-line CheckpointError, no output.

Each test copies a fixture adapter, breaks one thing (adapter_config.json or
adapter_model.safetensors) and checks that `merge` refuses it, naming the file / module / field.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures_models as fm
from stream_readapt import merge
from stream_readapt.io.safetensors_reader import CheckpointError

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"  # a module every fixture adapter targets


def broken_copy(src: Path, dst: Path, *, config=None, tensors=None, raw_config: str | None = None) -> Path:
    """Copy adapter `src` to `dst`; `config(dict)` / `tensors(dict)` edit it in place."""
    shutil.copytree(src, dst)
    cfg_path = dst / "adapter_config.json"
    if raw_config is not None:
        cfg_path.write_text(raw_config)
    if config is not None:
        cfg = json.loads(cfg_path.read_text())
        config(cfg)
        cfg_path.write_text(json.dumps(cfg))  # NaN / Infinity as Python's json writes and reads them
    if tensors is not None:
        t = load_file(dst / "adapter_model.safetensors")
        tensors(t)
        save_file(t, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def assert_refused(pair, adapter: Path, tmp_path: Path, pattern: str) -> str:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        merge(pair.base, out, instruct=pair.instruct, knowledge=adapter, device="cpu")
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    assert re.search(pattern, msg), msg
    assert not out.exists(), "a failed merge left an output folder behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    return msg


def setter(**kv):
    return lambda cfg: cfg.update(kv)


# ----------------------------------------------------------------------------- 1. adapter_config.json

@pytest.mark.parametrize("raw", ["[1]", '"lora"', "null", "8"])
def test_config_not_an_object(llama_pair, lora_adapter, tmp_path, raw):
    bad = broken_copy(lora_adapter, tmp_path / "a", raw_config=raw)
    assert_refused(llama_pair, bad, tmp_path, re.escape(str(bad / "adapter_config.json")) + ": expected a JSON object")


@pytest.mark.parametrize("raw", ['{r: 8}', '{"r": 8,', ""])
def test_config_malformed_json(llama_pair, lora_adapter, tmp_path, raw):
    bad = broken_copy(lora_adapter, tmp_path / "a", raw_config=raw)
    assert_refused(llama_pair, bad, tmp_path, re.escape(str(bad / "adapter_config.json")) + ": invalid JSON")


def test_config_not_utf8(llama_pair, lora_adapter, tmp_path):
    bad = broken_copy(lora_adapter, tmp_path / "a")
    (bad / "adapter_config.json").write_bytes(b'{"r": "\xff"}')
    assert_refused(llama_pair, bad, tmp_path, re.escape(str(bad / "adapter_config.json")) + ": invalid JSON")


@pytest.mark.parametrize("field, value", [
    ("use_dora", "false"), ("use_rslora", 1), ("lora_bias", "no"),
    ("rank_pattern", ["q_proj"]), ("alpha_pattern", {"(q_proj": 3}),
])
def test_config_field_types(llama_pair, lora_adapter, tmp_path, field, value):
    bad = broken_copy(lora_adapter, tmp_path / "a", config=setter(**{field: value}))
    assert_refused(llama_pair, bad, tmp_path, rf"adapter_config\.json: {field} ")


# ----------------------------------------------------------------------------- 2. rank vs tensors

@pytest.mark.parametrize("r, why", [
    (0, "is not a positive integer"), ("eight", "is not a positive integer"), (True, "is not a positive integer"),
    (8.0, "is not a positive integer"), (None, "is not a positive integer"),
    (4, "PEFT would refuse to load it"), (16, "PEFT would refuse to load it"),
])
def test_rank_must_match_tensors(llama_pair, lora_adapter, tmp_path, r, why):
    bad = broken_copy(lora_adapter, tmp_path / "a", config=setter(r=r))
    msg = assert_refused(llama_pair, bad, tmp_path, rf"module 'model\.layers\.\d\..+': adapter_config\.json r = .*{why}")
    assert f"r = {r!r}" in msg and "rank 8" in msg


def test_rank_pattern_must_match_tensors(llama_pair, rslora_adapter, tmp_path):
    # rslora: r=8, rank_pattern {"q_proj": 4, "layers.1.mlp.down_proj": 12}
    wrong = broken_copy(rslora_adapter, tmp_path / "wrong", config=lambda c: c["rank_pattern"].update(q_proj=6))
    assert_refused(llama_pair, wrong, tmp_path, r"q_proj': adapter_config\.json rank_pattern\['q_proj'\] = 6 but its tensors have rank 4")
    dropped = broken_copy(rslora_adapter, tmp_path / "dropped", config=setter(rank_pattern={}))
    assert_refused(llama_pair, dropped, tmp_path, r"(q_proj|down_proj)': adapter_config\.json r = 8 but its tensors have rank (4|12)")


def test_factor_ranks_disagree(llama_pair, lora_adapter, tmp_path):
    def shrink_b(t):
        t[f"{P}{Q}.lora_B.weight"] = t[f"{P}{Q}.lora_B.weight"][:, :4].contiguous()

    bad = broken_copy(lora_adapter, tmp_path / "a", tensors=shrink_b)
    assert_refused(llama_pair, bad, tmp_path, rf"module '{Q}': .*rank 8 \(lora_A rows\) / 4 \(lora_B columns\)")


def test_factor_not_2d(llama_pair, lora_adapter, tmp_path):
    bad = broken_copy(lora_adapter, tmp_path / "a", tensors=lambda t: t.__setitem__(f"{P}{Q}.lora_A.weight", torch.zeros(8)))
    assert_refused(llama_pair, bad, tmp_path, rf"module '{Q}' factors have shapes \[8\] and \[64, 8\], not 2-D")


# ----------------------------------------------------------------------------- 3. lora_alpha

@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "16", None, True, [16]])
def test_lora_alpha_must_be_finite_number(llama_pair, lora_adapter, tmp_path, alpha):
    bad = broken_copy(lora_adapter, tmp_path / "a", config=setter(lora_alpha=alpha))
    assert_refused(llama_pair, bad, tmp_path, r"adapter_config\.json lora_alpha = .* is not a finite number")


@pytest.mark.parametrize("alpha", [float("nan"), float("-inf"), "3", False])
def test_alpha_pattern_must_be_finite_number(llama_pair, rslora_adapter, tmp_path, alpha):
    bad = broken_copy(rslora_adapter, tmp_path / "a", config=lambda c: c["alpha_pattern"].update(v_proj=alpha))
    assert_refused(llama_pair, bad, tmp_path, r"alpha_pattern\['v_proj'\] = .* \(module '.*v_proj'\) is not a finite number")


# ----------------------------------------------------------------------------- 4. use_dora vs magnitudes

def test_dora_weights_without_use_dora(llama_pair, dora_adapter, tmp_path):
    for i, edit in enumerate((setter(use_dora=False), lambda c: c.pop("use_dora"))):
        bad = broken_copy(dora_adapter, tmp_path / f"a{i}", config=edit)
        assert_refused(llama_pair, bad, tmp_path, r"has a DoRA lora_magnitude_vector but adapter_config\.json does not set use_dora")


def test_use_dora_with_missing_magnitude(llama_pair, dora_adapter, lora_adapter, tmp_path):
    bad = broken_copy(dora_adapter, tmp_path / "dora", tensors=lambda t: t.pop(f"{P}{Q}.lora_magnitude_vector"))
    assert_refused(llama_pair, bad, tmp_path, rf"use_dora = true but module '{Q}' has no lora_magnitude_vector")
    plain = broken_copy(lora_adapter, tmp_path / "lora", config=setter(use_dora=True))
    assert_refused(llama_pair, plain, tmp_path, r"use_dora = true but module '.+' has no lora_magnitude_vector")


# ----------------------------------------------------------------------------- 5. DoRA magnitude length

@pytest.mark.parametrize("size", [63, 65])
def test_dora_magnitude_wrong_length(llama_pair, dora_adapter, tmp_path, size):
    def resize(t):
        m = t[f"{P}{Q}.lora_magnitude_vector"]
        t[f"{P}{Q}.lora_magnitude_vector"] = torch.cat([m, m])[:size].contiguous()

    bad = broken_copy(dora_adapter, tmp_path / "a", tensors=resize)
    assert_refused(llama_pair, bad, tmp_path, rf"'{Q}' DoRA lora_magnitude_vector has shape \[{size}\] but the base weight has 64 output rows")


# ----------------------------------------------------------------------------- 6. lora_B.bias

def test_lora_bias_without_base_bias(llama_pair, lora_adapter, tmp_path):
    bad = broken_copy(lora_adapter, tmp_path / "a", config=setter(lora_bias=True),
                      tensors=lambda t: t.__setitem__(f"{P}{Q}.lora_B.bias", torch.ones(64)))
    assert_refused(llama_pair, bad, tmp_path, rf"'{Q}' has a lora_B.bias .* base layer .* has no bias: not supported")


@pytest.mark.parametrize("shape", [(63,), (64, 1), ()])
def test_lora_bias_wrong_shape(llama_pair, lora_adapter, tmp_path, shape):
    bad = broken_copy(lora_adapter, tmp_path / "a", config=setter(lora_bias=True),
                      tensors=lambda t: t.__setitem__(f"{P}{Q}.lora_B.bias", torch.ones(shape)))
    assert_refused(llama_pair, bad, tmp_path, rf"'{Q}' lora_B.bias has shape \[{', '.join(map(str, shape))}\] but the base weight has 64 output rows")


def test_lora_bias_with_config_false(llama_pair, lora_adapter, tmp_path):
    def add_bias(t):
        t[f"{P}{Q}.lora_B.bias"] = torch.ones(64)

    bad = broken_copy(lora_adapter, tmp_path / "a", tensors=add_bias, config=setter(lora_bias=False))
    assert_refused(llama_pair, bad, tmp_path, rf"module '{Q}' has a lora_B.bias but adapter_config\.json has lora_bias = false")


def test_lora_bias_on_biased_base_matches_peft(qwen_tied_pair, tmp_path):
    """Qwen2 q/v have biases: lora_B.bias·s is added to them, as in PEFT's merge_and_unload."""
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"])
    adapter = fm.build_adapter(qwen_tied_pair.base, tmp_path / "bias_lora", cfg)
    assert any(k.endswith("lora_B.bias") for k in fm.checkpoint_keys(adapter))
    merge(qwen_tied_pair.base, tmp_path / "out", instruct=qwen_tied_pair.instruct, knowledge=adapter, alpha=1, beta=0, device="cpu")
    got, want = fm.load_state_dict(tmp_path / "out"), fm.peft_merged_state_dict(qwen_tied_pair.base, adapter)
    assert set(got) == set(want)
    base = fm.load_state_dict(qwen_tied_pair.base)
    assert not torch.equal(want[f"{Q}.bias"], base[f"{Q}.bias"])  # the bias term is really exercised
    for k in want:
        err = float((got[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-30))
        assert err <= 1e-6, (k, err)


def test_integer_factors_are_refused(llama_pair, lora_adapter, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = broken_copy(lora_adapter, tmp_path / "a", tensors=lambda t: t.update({key: t[key].to(torch.int32)}))
    assert_refused(llama_pair, bad, tmp_path, re.escape(key) + "' is int32; only floating-point")
