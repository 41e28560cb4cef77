"""LoRE-Adapters: PEFT loads them unchanged, ranks follow the energy target, output is reproducible."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import fixtures_models as fm
from stream_readapt import extract, merge
from stream_readapt.cli import main
from stream_readapt.lowrank.svd import rank_for_energy

IDS = torch.tensor([[1, 5, 9, 42, 7, 299, 3]])


def peft_logits(base_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def lore_half(llama_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("lore") / "half"
    manifest = extract(llama_pair.base, llama_pair.instruct, out, energy=0.5, device="cpu")
    return out, manifest


def assert_ranks_reach_energy_and_are_minimal(pair, manifest) -> None:
    """τ = 0.5 ranks: at least the exact k*, at most 5% above it, error ≤ 1.02× the optimum."""
    phi, theta = fm.load_state_dict(pair.base), fm.load_state_dict(pair.instruct)
    lows = {m: r for m, r in manifest["modules"].items() if "rank" in r}
    assert len(lows) == 14  # every attention and MLP projection; embeddings stay full
    for module, rec in lows.items():
        delta = (theta[module + ".weight"] - phi[module + ".weight"]).double()
        sigma = torch.linalg.svdvals(delta)
        exact_k = rank_for_energy(sigma, 0.5)
        assert exact_k <= rec["rank"] <= max(exact_k + 1, int(1.05 * exact_k)), module
        optimum = float(sigma[rec["rank"]:].square().sum().sqrt() / sigma.square().sum().sqrt())
        assert rec["rel_error"] <= 1.02 * optimum + 1e-6 and rec["energy"] >= 0.5


def test_ranks_reach_energy_and_are_minimal(llama_pair, lore_half):
    assert_ranks_reach_energy_and_are_minimal(llama_pair, lore_half[1])


def test_peft_loads_it_and_approximates_instruct(llama_pair, lore_half):
    out, _ = lore_half
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] is not None
    full = peft_logits(llama_pair.base, out)
    instruct, base = fm.logits(llama_pair.instruct, IDS), fm.logits(llama_pair.base, IDS)
    # τ = 0.5 keeps half the energy: the adapted base moves most of the way toward the instruct model.
    assert (full - instruct).norm() < 0.6 * (base - instruct).norm()


def test_full_energy_reproduces_instruct_through_peft(llama_pair, tmp_path):
    extract(llama_pair.base, llama_pair.instruct, tmp_path / "lore", max_error=1e-4, device="cpu")
    torch.testing.assert_close(peft_logits(llama_pair.base, tmp_path / "lore"), fm.logits(llama_pair.instruct, IDS), rtol=1e-3, atol=1e-3)


def test_peft_merge_equals_our_merge(llama_pair, lore_half, tmp_path):
    out, _ = lore_half
    merge(llama_pair.base, tmp_path / "ours", readapter=out, alpha=0, beta=1, device="cpu")
    reference = fm.peft_merged_state_dict(llama_pair.base, out)
    got = fm.load_state_dict(tmp_path / "ours")
    for k, v in reference.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_same_seed_same_bytes(llama_pair, tmp_path):
    for name in ("a", "b"):
        extract(llama_pair.base, llama_pair.instruct, tmp_path / name, energy=0.5, seed=7, device="cpu")
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    extract(llama_pair.base, llama_pair.instruct, tmp_path / "c", energy=0.5, seed=8, device="cpu")
    assert a != (tmp_path / "c" / "adapter_model.safetensors").read_bytes()


def test_fixed_rank_cap_and_embeddings(llama_pair, tmp_path):
    m = extract(llama_pair.base, llama_pair.instruct, tmp_path / "r", rank=5, embeddings="lora", device="cpu")
    ranks = {k: v["rank"] for k, v in m["modules"].items() if "rank" in v}
    assert set(ranks.values()) == {5} and "model.embed_tokens" in ranks and "lm_head" in ranks
    m = extract(llama_pair.base, llama_pair.instruct, tmp_path / "cap", energy=0.99, max_rank=3, device="cpu")
    assert max(v["rank"] for v in m["modules"].values() if "rank" in v) == 3
    peft_logits(llama_pair.base, tmp_path / "r")  # loads with embedding LoRA factors


def test_tied_qwen_biases_through_peft(qwen_tied_pair, tmp_path):
    extract(qwen_tied_pair.base, qwen_tied_pair.instruct, tmp_path / "lore", max_error=1e-4, device="cpu")
    assert json.loads((tmp_path / "lore" / "adapter_config.json").read_text())["bias"] == "all"
    torch.testing.assert_close(
        peft_logits(qwen_tied_pair.base, tmp_path / "lore"), fm.logits(qwen_tied_pair.instruct, IDS), rtol=1e-3, atol=1e-3
    )


def test_serving_limit_warning(caplog):
    from stream_readapt.lowrank.lore import serving_report

    modules = {"a.q_proj": {"rank": 300}, "a.k_proj": {"rank": 100}, "a.v_proj": {"rank": 12}, "model.norm": {"kind": "full"}}
    with caplog.at_level(logging.WARNING):
        report = serving_report(modules)
    assert report["max_rank"] == 300
    assert report["over_64"] == ["a.k_proj", "a.q_proj"] and report["over_256"] == ["a.q_proj"]
    assert "2 modules have rank > 64 (max 300 in a.q_proj)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        serving_report({"a.v_proj": {"rank": 12}})
    assert caplog.text == ""


def test_inspect_summary_and_plot(lore_half, tmp_path, capsys):
    out, _ = lore_half
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "self_attn.q_proj" in text and "mlp.down_proj" in text and "lore-adapter" in text
    pytest.importorskip("matplotlib")
    assert main(["inspect", str(out), "--plot", str(tmp_path / "spectra.png")]) == 0
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_plot_never_writes_over_a_file_or_through_a_link(lore_half, tmp_path, capsys, kind):
    """`inspect --plot P` once replaced an input's config.json with PNG bytes through a link."""
    pytest.importorskip("matplotlib")
    victim = tmp_path / "config.json"
    victim.write_text('{"model_type": "llama"}')
    target = victim if kind == "file" else tmp_path / "plot.png"
    if kind == "symlink":
        target.symlink_to(victim)
    rc = main(["inspect", str(lore_half[0]), "--plot", str(target)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "already exists" in err and len(err.splitlines()) == 1
    assert victim.read_text() == '{"model_type": "llama"}'


def test_demo_refuses_a_folder_that_holds_something(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "mine.txt").write_text("keep me")
    rc = main(["demo", "--dir", str(tmp_path), "--quiet"])
    assert rc != 0 and "must be a new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "base" / "mine.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1
