"""Routers that subclass nn.Linear and return tuples (Phi-MoE, Llama-4): never LoRA'd as Linear
layers. Their LoRE goes in by PEFT target_parameters, patch_model rewrites their weight instead of
wrapping the module, and both equal the streaming merge of the same LoRE-Adapter."""

from __future__ import annotations

import json

import pytest
import torch

import fixtures_models as fm

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROUTERS = {"phimoe": "model.layers.0.mlp.router", "llama4_text": "model.layers.0.feed_forward.router"}


def _config(family: str):
    from transformers import Llama4TextConfig, PhimoeConfig

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, max_position_embeddings=128, tie_word_embeddings=False)
    if family == "phimoe":
        return PhimoeConfig(num_experts_per_tok=2, **common)
    return Llama4TextConfig(intermediate_size_mlp=48, head_dim=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
                            attention_chunk_size=32, **common)


@pytest.fixture(scope="module", params=sorted(ROUTERS))
def router_pair(request, tmp_path_factory):
    """(family, base, instruct): a random base, and an instruct model = base + noise on every tensor."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param))
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(root / "instruct")
    return request.param, root / "base", root / "instruct"


def test_router_is_a_parameter_target_and_loads_in_peft_as_the_merge(router_pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stream_readapt import extract, merge

    family, base, instruct = router_pair
    extract(base, instruct, tmp_path / "lore", rank=3, dtype="float32")
    config = json.loads((tmp_path / "lore" / "adapter_config.json").read_text())
    router = ROUTERS[family]
    assert router + ".weight" in config["target_parameters"]
    targets = config["target_modules"]
    assert not any(router.endswith(t) or t.endswith(".router") or t == "router" for t in targets)
    merge(base, tmp_path / "merged", readapter=tmp_path / "lore", alpha=0.0, beta=1.0, dtype="float32")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           str(tmp_path / "lore"))
    with torch.no_grad():
        got = peft_model(ids).logits  # a router wrapped as a Linear LoRA would fail on its tuple here
    torch.testing.assert_close(got, fm.logits(tmp_path / "merged", ids), rtol=1e-4, atol=1e-4)


def test_patch_model_keeps_the_router_module_and_matches_the_merge(router_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from stream_readapt import extract, merge, patch_model, set_scales

    family, base, instruct = router_pair
    extract(base, instruct, tmp_path / "lore", rank=3, dtype="float32")  # fused experts: Δ from a LoRE-Adapter
    merge(base, tmp_path / "merged", readapter=tmp_path / "lore", alpha=0.0, beta=0.6, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    router_class = type(model.get_submodule(ROUTERS[family]))
    patch_model(model, readapter=tmp_path / "lore", alpha=0.0, beta=0.2)
    set_scales(model, alpha=0.0, beta=0.6)
    assert type(model.get_submodule(ROUTERS[family])) is router_class  # not a ReadaptLinear
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, fm.logits(tmp_path / "merged", ids), rtol=1e-4, atol=1e-4)
