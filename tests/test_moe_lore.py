"""Per-expert LoRE: batched randomized SVD vs exact SVDs, and the packing vs PEFT's ParamWrapper."""

import copy

import pytest
import torch

from fixtures_moe import build_moe_pair
from stream_readapt.lowrank.svd import rank_for_energy
from stream_readapt.lowrank.moe_lore import ExpertOptions, lowrank_experts, pack_for_peft


def _experts(E, m, n, seed=0):
    """Δ_e with a decaying spectrum, a different decay per expert."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in range(E):
        U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
        s = torch.exp(-torch.arange(min(m, n), dtype=torch.float64) / (3 + 4 * e))
        out.append((U * s) @ V.T)
    return torch.stack(out)


@pytest.mark.parametrize("m, n, chunk", [(45, 37, 2), (31, 70, 3)])
def test_energy_ranks_match_exact_svd(m, n, chunk):
    D = _experts(5, m, n)
    f = lowrank_experts(D.float().split(chunk), ExpertOptions(energy=0.9))
    assert len(f) == 5
    for e, fe in enumerate(f):
        s = torch.linalg.svdvals(D[e])
        k_exact = rank_for_energy(s, 0.9)
        assert k_exact <= fe.rank <= k_exact + 1
        optimal = float(s[fe.rank:].square().sum().sqrt() / s.square().sum().sqrt())
        err = float((D[e] - (fe.B @ fe.A).double()).norm() / D[e].norm())
        assert err <= optimal * 1.01 + 1e-6 and err <= (1 - 0.9) ** 0.5 + 1e-6
        assert abs(fe.rel_error - err) < 1e-3
    assert len({fe.rank for fe in f}) > 1  # ranks differ per expert


@pytest.fixture(scope="module")
def peft_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_pack")
    return {arch: build_moe_pair(arch, root / arch).base for arch in ("qwen3_moe", "gpt_oss")}


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_packing_is_what_peft_applies(peft_models, arch):
    """PEFT's own ParamWrapper.get_delta_weight on our packed lora_A/B gives each expert's B·A."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(peft_models[arch], dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    param = experts.gate_up_proj  # [E, 2I, H], gpt-oss [E, H, 2I]
    D = _experts(param.shape[0], *param.shape[1:], seed=1).float()
    factors = lowrank_experts(D.split(2), ExpertOptions(energy=0.8))
    transposed = arch == "gpt_oss"
    pack = pack_for_peft(factors, transposed=transposed)
    assert pack.padding == pytest.approx(1 - sum(pack.ranks) / (pack.rank * len(pack.ranks)))
    config = LoraConfig(r=pack.rank, lora_alpha=pack.rank, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    wrapper = peft_model.base_model.model.model.layers[0].mlp.experts
    assert wrapper.parameter_name == "gate_up_proj"
    with torch.no_grad():
        wrapper.lora_A["default"].weight.copy_(pack.A)
        wrapper.lora_B["default"].weight.copy_(pack.B)
    delta = wrapper.get_delta_weight("default")
    for e, f in enumerate(factors):
        torch.testing.assert_close(delta[e], f.B @ f.A, rtol=1e-5, atol=1e-6)
