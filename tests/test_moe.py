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
    from stream_readapt.io.checkpoint import Checkpoint
    from stream_readapt.terms.peft_adapter import PeftAdapter

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
    # one ParamWrapper per expert tensor and layer: gate_up_proj inside (base_layer), down_proj outside
    assert sum(k.endswith("experts.lora_A.weight") for k in keys) == 2
    assert sum(k.endswith("experts.base_layer.lora_A.weight") for k in keys) == 2
    config = json.loads((tmp_path / "lore" / "adapter_config.json").read_text())
    assert all(not m.endswith("experts") for m in config["target_modules"])


def _logits(model_dir, adapter=None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lores(moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_lore")
    return {arch: extract(pair.base, pair.instruct, root / arch, max_error=1e-4) and root / arch
            for arch, (pair, _) in moe.items()}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_lore_adapter_in_peft_is_the_instruct_model(moe, lores, arch):
    pair, _ = moe[arch]
    config = json.loads((lores[arch] / "adapter_config.json").read_text())
    assert any("experts.gate_up_proj" in p for p in config["target_parameters"])
    with safe_open(lores[arch] / "adapter_model.safetensors", "pt") as f:  # experts never saved whole
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj", "w1.weight")) for k in f.keys())
    assert_rel_close(_logits(pair.base, lores[arch]), _logits(pair.instruct), 1e-4, arch)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_merge_from_moe_lore_adapter(moe, lores, arch, tmp_path):
    pair, _ = moe[arch]
    merge(pair.base, tmp_path / "m", readapter=lores[arch], alpha=0.0, beta=1.0)
    assert_rel_close(_logits(tmp_path / "m"), _logits(pair.instruct), 1e-4, arch)


def test_lore_size_at_energy_half(moe, tmp_path, capsys):
    """The paper's τ = 0.5: the adapter vs the model, and the padding of per-expert ranks."""
    pair, _ = moe["qwen3_moe"]
    manifest = extract(pair.base, pair.instruct, tmp_path / "lore", energy=0.5)
    size = (tmp_path / "lore" / "adapter_model.safetensors").stat().st_size
    model = (pair.base / "model.safetensors").stat().st_size
    experts = {m: r for m, r in manifest["modules"].items() if r["kind"] == "experts"}
    assert experts and all(0 <= r["padding"] < 1 and len(r["expert_ranks"]) == 4 for r in experts.values())
    assert size < model
    with capsys.disabled():
        print(f"\nqwen3_moe LoRE --energy 0.5: {size} bytes vs model {model} ({size / model:.1%}); "
              f"expert padding {[r['padding'] for r in experts.values()]}")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_patch_model_matches_merged(moe, lores, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from stream_readapt import patch_model, set_scales

    pair, lora = moe[arch]
    merge(pair.base, tmp_path / "m", readapter=lores[arch], knowledge=lora, alpha=0.5, beta=0.5)
    model = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
    patch_model(model, readapter=lores[arch], knowledge=lora, alpha=0.5, beta=0.5)
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_rel_close(model(input_ids=ids).logits, _logits(tmp_path / "m"), 1e-4, arch)
        set_scales(model, alpha=0.0, beta=1.0)  # live: now the instruct model (up to the LoRE error)
        assert_rel_close(model(input_ids=ids).logits, _logits(pair.instruct), 1e-4, arch)


def test_expert_adapter_with_wrong_rank_is_refused(moe, tmp_path):
    """A config rank that does not divide the factors over the experts: one line naming the parameter."""
    import shutil

    from stream_readapt.io.safetensors_reader import CheckpointError

    pair, lora = moe["mixtral"]
    bad = tmp_path / "bad"
    shutil.copytree(lora, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["rank_pattern"]["model.layers.0.mlp.experts.gate_up_proj"] = 5  # the file has rank 4
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate_up_proj'.*= 5 over 4 experts needs lora_A \[20, 64\]"):
        merge(pair.base, tmp_path / "m", instruct=pair.instruct, knowledge=bad)
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def all_linear(moe, tmp_path_factory):
    """Adapters PEFT itself makes with target_modules="all-linear": on fused experts it writes
    bare target_parameters ("gate_up_proj", "down_proj") and a rank_pattern of its own."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("all_linear")
    return {arch: build_moe_adapter(moe[arch][0].base, root / arch, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
            for arch in MOE_ARCHS}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_merge_of_pefts_own_all_linear_adapter_matches_peft(moe, all_linear, arch, tmp_path):
    (pair, _), lora = moe[arch], all_linear[arch]
    targets = json.loads((lora / "adapter_config.json").read_text()).get("target_parameters") or []
    # PEFT 0.21 writes bare names on every fused-experts family here but gpt-oss (no target_parameters)
    assert (arch == "gpt_oss") == (not targets) and all("." not in t for t in targets if "gate" not in t)
    merge(pair.base, tmp_path / "m", instruct=pair.instruct, knowledge=lora, alpha=1.0, beta=0.0, device="cpu")
    ours, peft, base = _state(tmp_path / "m"), _state(pair.base, lora), _state(pair.base)
    moved = [k for k in peft if not torch.equal(peft[k], base[k])]
    assert moved and any("experts" in k for k in moved) == bool(targets)
    for key in peft:
        assert_rel_close(ours[key], peft[key], 1e-6, key)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_live_scales_follow_every_change_cached_or_not(moe, lores, arch, dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    from stream_readapt import patch_model, set_scales

    pair, lora = moe[arch]
    name = str(dtype).replace("torch.", "")
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    want = {}
    for a, b in ((0.2, 0.9), (0.7, 0.3)):
        merge(pair.base, tmp_path / f"m{a}", readapter=lores[arch], knowledge=lora, alpha=a, beta=b, dtype=name)
        with torch.no_grad():
            want[a, b] = AutoModelForCausalLM.from_pretrained(tmp_path / f"m{a}", dtype=dtype).eval()(input_ids=ids).logits
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for cached in (True, False):
        model = AutoModelForCausalLM.from_pretrained(pair.base, dtype=dtype).eval()
        patch_model(model, readapter=lores[arch], knowledge=lora, alpha=0.0, beta=0.0, cache_weights=cached)
        for (a, b), logits in want.items():
            set_scales(model, alpha=1.0, beta=0.0)
            set_scales(model, alpha=a, beta=b)
            with torch.no_grad():
                assert_rel_close(model(input_ids=ids).logits.float(), logits.float(), tol, f"{arch} {cached} {a},{b}")
