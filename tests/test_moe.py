"""MoE models end to end: Mixtral, Qwen3-MoE, DeepSeek-V3 (MLA) and gpt-oss, tiny, built here."""

import json

import pytest
import torch
from safetensors import safe_open

from fixtures_moe import MOE_ARCHS, build_moe_adapter, build_moe_pair, moe_lora_config
from fixtures_models import single_thread
from stream_readapt import extract, merge
from utils_compare import assert_rel_close


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in MOE_ARCHS:
        pair = build_moe_pair(arch, root / arch)
        out[arch] = (pair, build_moe_adapter(pair.base, root / arch / "lora", moe_lora_config(arch)))
    return out


@single_thread()
def _state(model_dir, adapter=None) -> dict[str, torch.Tensor]:
    """The in-memory state dict transformers loads (PEFT-merged when `adapter` is given)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_merge_knowledge_matches_peft_merge_and_unload(moe, arch, tmp_path):
    (pair, lora) = moe[arch]
    merge(pair.base, tmp_path / "m", instruct=pair.instruct, knowledge=lora, alpha=1.0, beta=0.0,
          block_bytes=2048)  # small blocks: expert matrices split across row blocks
    ours, peft = _state(tmp_path / "m"), _state(pair.base, lora)
    base = _state(pair.base)
    assert set(ours) == set(peft)
    moved = [k for k in peft if not torch.equal(peft[k], base[k])]
    assert any("experts.gate_up_proj" in k for k in moved) and any("experts.down_proj" in k for k in moved)
    for key in peft:
        assert_rel_close(ours[key], peft[key], 1e-6, key)


def test_rank_per_expert_is_not_refused(moe):
    """r = 4 with lora_A of 16 rows (4 experts): PEFT loads it, so must we."""
    from stream_readapt.checkpoint import Checkpoint
    from stream_readapt.peft_adapter import PeftAdapter

    pair, lora = moe["qwen3_moe"]
    adapter = PeftAdapter(lora)
    with Checkpoint.from_folder(pair.base) as base:
        adapter.check_base(base)
    loras = adapter.experts.by_param
    assert loras["model.layers.1.mlp.experts.down_proj"].rank == 3  # rank_pattern on the parameter name
    assert loras["model.layers.1.mlp.experts.gate_up_proj"].rank == 4
    adapter.close()


def test_gpt_oss_lore_file_is_valid(moe, tmp_path):
    """The planning bug (two lora_A under `mlp.experts`) wrote a corrupt file and exited 0."""
    pair, _ = moe["gpt_oss"]
    extract(pair.base, pair.instruct, tmp_path / "lore", max_error=1e-4)
    with safe_open(tmp_path / "lore" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).numel() for k in keys)
    assert len(keys) == len(set(keys))
    assert not any(k.endswith("experts.lora_A.weight") for k in keys)
    config = json.loads((tmp_path / "lore" / "adapter_config.json").read_text())
    assert all(not m.endswith("experts") for m in config["target_modules"])
