"""Serving profiles: each consumer's adapter gives PEFT's Δ; vLLM's own code loads and scales it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import consumers
import fixtures_models as fm
from stream_readapt import extract
from stream_readapt.cli import main
from stream_readapt.serving.check import check_adapter

PROFILES = ["vllm", "sglang", "llama.cpp", "portable"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def adapters(llama_pair, tmp_path_factory):
    """The PEFT LoRE-Adapter (embeddings low-rank, so every profile has the same Δ to start from) and each profile's."""
    root = tmp_path_factory.mktemp("serving")
    out = {"peft": extract(llama_pair.base, llama_pair.instruct, root / "peft", energy=0.5, device="cpu",
                           embeddings="lora")}
    out["peft-default"] = extract(llama_pair.base, llama_pair.instruct, root / "peft-default", energy=0.5, device="cpu")
    for name in PROFILES:
        out[name] = extract(llama_pair.base, llama_pair.instruct, root / name, energy=0.5, device="cpu", profile=name)
    return types.SimpleNamespace(root=root, manifests=out)


@pytest.fixture(scope="module")
def peft_deltas(llama_pair, adapters):
    """Δ per base tensor as PEFT applies each adapter (merge_and_unload − base), float32."""
    phi = fm.load_state_dict(llama_pair.base)
    deltas = {}
    for name in ["peft", *PROFILES]:
        merged = fm.peft_merged_state_dict(llama_pair.base, adapters.root / name)
        deltas[name] = {k: merged[k] - phi[k].float() for k in phi}
    return deltas


def test_ranks_differ_per_module(adapters):
    ranks = {r["rank"] for r in adapters.manifests["peft"]["modules"].values() if "rank" in r}
    assert len(ranks) > 2  # otherwise the scaling rules below could not disagree


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_keeps_peft_delta_on_what_it_carries(adapters, peft_deltas, profile):
    report = adapters.manifests[profile]["profile"]
    dropped = {n.replace(".base_layer", "") for n in report["dropped"]}
    ref, got = peft_deltas["peft"], peft_deltas[profile]
    for key, delta in ref.items():
        module = key.rsplit(".", 1)[0]
        if module in dropped or key in dropped:
            assert got[key].abs().max() == 0, key  # dropped: the consumer serves the base there
        else:
            torch.testing.assert_close(got[key], delta, rtol=1e-5, atol=1e-6, msg=key)


def test_dropped_share_is_the_dropped_part_of_delta(adapters, peft_deltas):
    ref, got = peft_deltas["peft"], peft_deltas["portable"]
    total = sum(float(d.double().square().sum()) for d in ref.values())
    missing = sum(float((ref[k] - got[k]).double().square().sum()) for k in ref)
    report = adapters.manifests["portable"]["profile"]
    assert report["dropped"] and report["dropped_share"] == pytest.approx((missing / total) ** 0.5, rel=1e-3)


def test_uniform_rank_profiles_pad_and_report(adapters):
    for name in ("sglang", "portable"):
        config = json.loads((adapters.root / name / "adapter_config.json").read_text())
        tensors = load_file(adapters.root / name / "adapter_model.safetensors")
        ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
        report = adapters.manifests[name]["profile"]
        assert ranks == {config["r"]} and not config["rank_pattern"] and config["lora_alpha"] == config["r"]
        assert report["padded_modules"] > 0 and report["padding_bytes"] > 0


def test_profiles_carry_no_full_tensors_or_biases(adapters):
    for name in PROFILES:
        config = json.loads((adapters.root / name / "adapter_config.json").read_text())
        keys = load_file(adapters.root / name / "adapter_model.safetensors").keys()
        assert config["modules_to_save"] is None and config["bias"] == "none" and not config["alpha_pattern"]
        assert all("lora_" in k for k in keys), name


@pytest.mark.parametrize("consumer, profile", [("vllm", "vllm"), ("vllm", "portable"), ("sglang", "sglang"),
                                               ("sglang", "portable"), ("llama.cpp", "llama.cpp"), ("llama.cpp", "portable")])
def test_check_passes_each_profile(adapters, consumer, profile):
    assert check_adapter(adapters.root / profile, consumer) == []


@pytest.mark.parametrize("consumer, reason", [("vllm", "modules_to_save"), ("sglang", "per-module ranks"),
                                              ("llama.cpp", "scaled unlike PEFT")])
def test_check_names_why_the_peft_adapter_fails(adapters, consumer, reason):
    reasons = check_adapter(adapters.root / "peft", consumer)
    assert any(reason in r for r in reasons), reasons


def test_check_cli_one_line_per_reason(adapters, capsys):
    assert main(["inspect", str(adapters.root / "peft-default"), "--check", "llama.cpp"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "would NOT load" in out[0] and any("convert_lora_to_gguf.py stops" in line for line in out[1:])


def test_added_tokens_refused_with_the_way_out(llama_added_tokens_pair, tmp_path, capsys):
    out = tmp_path / "vllm"
    code = main(["extract", str(llama_added_tokens_pair.base), str(llama_added_tokens_pair.instruct), "-o", str(out),
                 "--energy", "0.5", "--profile", "vllm", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "merge" in err[0] and "adds tokens" in err[0]
    assert not out.exists()


def test_dropped_named_in_one_warning(llama_pair, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="stream_readapt.serving.profiles"):
        extract(llama_pair.base, llama_pair.instruct, tmp_path / "p", rank=3, device="cpu", profile="portable")
    warnings = [r for r in caplog.records if r.name == "stream_readapt.serving.profiles"]
    assert len(warnings) == 1 and "input_layernorm.weight" in warnings[0].getMessage() and "%" in warnings[0].getMessage()


# ----------------------------------------------------------------------------- vLLM's own code


@pytest.fixture(scope="module")
def vllm():
    return consumers.vllm_lora()


def _vllm_max_lora_rank(rank: int):
    return types.SimpleNamespace(max_lora_rank=rank)


def test_vllm_refuses_the_peft_adapter_and_check_says_why(vllm, adapters):
    helper = vllm.PEFTHelper.from_local_dir(str(adapters.root / "peft-default"), max_position_embeddings=128)
    with pytest.raises(ValueError, match="modules_to_save"):
        helper.validate_legal(_vllm_max_lora_rank(512))
    assert any("modules_to_save" in r for r in check_adapter(adapters.root / "peft-default", "vllm"))


@pytest.mark.parametrize("profile", ["vllm", "portable"])
def test_vllm_loads_profile_and_scales_as_peft(vllm, adapters, peft_deltas, profile):
    folder = adapters.root / profile
    helper = vllm.PEFTHelper.from_local_dir(str(folder), max_position_embeddings=128)
    needs = adapters.manifests[profile]["profile"]["needs_max_lora_rank"]
    helper.validate_legal(_vllm_max_lora_rank(needs))
    tensors = load_file(folder / "adapter_model.safetensors")
    factors = {}
    for key, t in tensors.items():
        assert not vllm.is_base_embedding_weights(key)
        module, is_a = vllm.parse_fine_tuned_lora_name(key)  # raises on names vLLM cannot load
        factors.setdefault(module, {})["A" if is_a else "B"] = t.float()
    assert factors
    for module, f in factors.items():
        rank, scaling = helper.get_rank_and_scaling(module)  # what LoRALayerWeights.from_config uses
        assert rank == f["A"].shape[0]
        embedding = module.endswith("embed_tokens")
        delta = scaling * (f["B"] @ f["A"])
        delta = delta.T if embedding else delta  # vLLM / PEFT embedding LoRA: (B·A)ᵀ rows per token
        torch.testing.assert_close(delta, peft_deltas[profile][module + ".weight"], rtol=1e-4, atol=1e-6, msg=module)


# ----------------------------------------------------------------------------- SGLang's own code


@pytest.mark.parametrize("profile", ["sglang", "portable"])
def test_sglang_config_fits_its_buffers_and_scales_as_peft(adapters, peft_deltas, profile):
    sglang = consumers.sglang_lora()
    # The rules applied below, as SGLang states them (fails loudly if a new version changes them):
    assert "self.scaling: float = self.config.lora_alpha / self.config.r" in sglang.sources["lora"]
    assert "lora_rank = lora_adapter.config.r" in sglang.sources["mem_pool"]
    config = sglang.LoRAConfig(str(adapters.root / profile))
    tensors = load_file(adapters.root / profile / "adapter_model.safetensors")
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = tensors[key.replace("lora_A", "lora_B")].float()
        assert a.shape[0] == config.r, key  # mem_pool.py: buffers are [.., r, ..]; a mismatch fails its assert
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = (config.lora_alpha / config.r) * (b @ a.float())
        torch.testing.assert_close(delta, peft_deltas[profile][module + ".weight"], rtol=1e-4, atol=1e-6, msg=module)


def test_sglang_buffers_refuse_per_module_ranks(adapters):
    sglang = consumers.sglang_lora()
    config = sglang.LoRAConfig(str(adapters.root / "vllm"))
    ranks = {t.shape[0] for k, t in load_file(adapters.root / "vllm" / "adapter_model.safetensors").items()
             if k.endswith("lora_A.weight")}
    assert ranks != {config.r}  # what check_sglang reports for this adapter
    assert any("per-module ranks" in r for r in check_adapter(adapters.root / "vllm", "sglang"))


def test_profile_without_low_rank_is_a_one_line_error(llama_pair, tmp_path, capsys):
    code = main(["extract", str(llama_pair.base), str(llama_pair.instruct), "-o", str(tmp_path / "x"), "--profile", "vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--energy" in err[0] and not (tmp_path / "x").exists()


def test_profile_adapter_is_the_same_bytes_in_every_process(llama_pair, tmp_path):
    """safetensors hands metadata back in hash-map order, which changes from process to process."""
    out = tmp_path / "vllm"
    script = ("import sys; from stream_readapt import extract; "
              "extract(sys.argv[1], sys.argv[2], sys.argv[3], energy=0.5, profile='vllm', device='cpu')")
    files = []
    for _ in range(3):
        subprocess.run([sys.executable, "-c", script, str(llama_pair.base), str(llama_pair.instruct), str(out)],
                       check=True)
        files.append((out / "adapter_model.safetensors").read_bytes())
        shutil.rmtree(out)
    assert files[0] == files[1] == files[2]
