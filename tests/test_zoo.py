"""The model zoo: every path on every family, each against its own reference, fp32, ≤ 1e-4 relative.

- merge (α = β = 0.5, instruct + LoRA) against a float64 recomputation whose Ψ is PEFT's own
  merge_and_unload; merge (α = 1, β = 0) against merge_and_unload itself; the merged folder
  loaded by transformers gives the logits of the reference weights.
- LoRE (`max_error` 1e-4) loaded by `PeftModel.from_pretrained` gives the instruct logits.
- patch_model (full RE-Adapter, and LoRE-Adapter) with the LoRA gives the merged checkpoint's logits.
"""

from __future__ import annotations

import pytest
import torch

import fixtures_models as fm
import zoo
from stream_readapt import extract, merge, patch_model
from utils_compare import assert_rel_close

TOL = 1e-4
_BUILT: dict[str, zoo.ZooModels] = {}


def _models(name: str, tmp_path_factory) -> zoo.ZooModels:
    if name not in _BUILT:
        _BUILT[name] = zoo.build_family(zoo.BY_NAME[name], tmp_path_factory.mktemp(f"zoo-{name}"))
    return _BUILT[name]


@pytest.fixture(params=[f.name for f in zoo.FAMILIES])
def family(request, tmp_path_factory) -> zoo.ZooModels:
    pytest.importorskip("peft")
    return _models(request.param, tmp_path_factory)


def _reference_model(m: zoo.ZooModels, weights: dict[str, torch.Tensor], folder):
    """The reference weights (checkpoint keys) loaded by transformers, in float64."""
    import shutil

    from safetensors.torch import save_file

    folder.mkdir()
    shutil.copy(m.base / "config.json", folder / "config.json")
    save_file({k: v.double().contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    return zoo.load(folder, torch.float64)


def test_merge_matches_float64_and_peft(family, tmp_path):
    out = tmp_path / "merged"
    merge(family.base, out, instruct=family.instruct, knowledge=family.lora, device="cpu")
    want = fm.reference_readapt_float64(family.base, family.instruct, family.lora)
    got = fm.load_state_dict(out)
    assert set(got) == set(want)
    for k in want:
        assert_rel_close(got[k], want[k], TOL, k)
    ids = zoo.input_ids()
    assert_rel_close(zoo.logits_of(zoo.load(out), ids), zoo.logits_of(_reference_model(family, want, tmp_path / "ref"), ids), TOL,
                     "merged logits")


def test_knowledge_only_merge_is_merge_and_unload(family, tmp_path):
    out = tmp_path / "merged"
    merge(family.base, out, instruct=family.instruct, knowledge=family.lora, alpha=1.0, beta=0.0, device="cpu")
    want = fm.peft_merged_state_dict(family.base, family.lora)
    got = fm.load_state_dict(out)
    for k in want:
        assert_rel_close(got[k], want[k], 1e-6, k)


def test_lore_in_peft_gives_instruct_logits(family, tmp_path):
    from peft import PeftModel

    extract(family.base, family.instruct, tmp_path / "lore", max_error=1e-4, device="cpu")
    model = PeftModel.from_pretrained(zoo.load(family.base), str(tmp_path / "lore")).eval()
    ids = zoo.input_ids()
    assert_rel_close(zoo.logits_of(model, ids), zoo.logits_of(zoo.load(family.instruct), ids), TOL, "LoRE logits")


@pytest.mark.parametrize("kind", ["full", "lore"])
def test_patch_model_gives_merged_logits(family, tmp_path, kind):
    readapter = tmp_path / kind
    options = {"max_error": 1e-4} if kind == "lore" else {"dtype": "float32"}
    extract(family.base, family.instruct, readapter, device="cpu", **options)
    merge(family.base, tmp_path / "merged", readapter=readapter, knowledge=family.lora, alpha=0.5, beta=0.5,
          device="cpu")
    model = patch_model(zoo.load(family.base), readapter=readapter, knowledge=family.lora, alpha=0.5, beta=0.5)
    ids = zoo.input_ids()
    assert_rel_close(zoo.logits_of(model, ids), zoo.logits_of(zoo.load(tmp_path / "merged"), ids), TOL,
                     "patched logits")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    pytest.importorskip("peft")
    family = zoo.Family("mixtral", "mixtral", {**zoo._LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2})
    return zoo.build_family(family, tmp_path_factory.mktemp("mixtral"))


def test_full_readapter_patch_on_moe_refuses_in_one_line(mixtral, tmp_path):
    """patch_model reaches fused experts through LoRE-Adapters (tests/test_moe.py); a full
    RE-Adapter keyed by per-expert checkpoint tensors is refused, naming the way out."""
    from stream_readapt.io.safetensors_reader import CheckpointError

    extract(mixtral.base, mixtral.instruct, tmp_path / "full", dtype="float32", device="cpu")
    with pytest.raises(CheckpointError, match="LoRE-Adapter") as e:
        patch_model(zoo.load(mixtral.base), readapter=tmp_path / "full")
    assert "\n" not in str(e.value)


def test_merge_of_moe_instruct_is_elementwise_exact(mixtral, tmp_path):
    """Merging Δ alone needs no roles: per-expert checkpoint tensors blend like any other."""
    merge(mixtral.base, tmp_path / "m", instruct=mixtral.instruct, alpha=0.0, beta=0.5, device="cpu")
    want = fm.reference_readapt_float64(mixtral.base, mixtral.instruct, None, alpha=0.0, beta=0.5)
    got = fm.load_state_dict(tmp_path / "m")
    for k in want:
        assert_rel_close(got[k], want[k], 1e-6, k)


def test_unknown_family_is_refused_not_guessed(tmp_path, tmp_path_factory):
    """A model_type transformers cannot build gets a one-line refusal naming it, not a LoRE
    adapter whose layers were guessed from names."""
    import json
    import shutil

    from stream_readapt.io.safetensors_reader import CheckpointError

    pytest.importorskip("peft")
    m = _models("llama", tmp_path_factory)
    for side in ("base", "instruct"):
        shutil.copytree(getattr(m, side), tmp_path / side)
        config = json.loads((tmp_path / side / "config.json").read_text())
        config["model_type"] = "made_up_arch"
        (tmp_path / side / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"LoRE-Adapt needs the transformers classes of model_type 'made_up_arch'") as e:
        extract(tmp_path / "base", tmp_path / "instruct", tmp_path / "lore", rank=2, device="cpu")
    assert "\n" not in str(e.value) and not (tmp_path / "lore").exists()


def _lore_targets(m: zoo.ZooModels):
    """The LoRE targets extract_lore plans for a pair (all tensors, embeddings as LoRA)."""
    from stream_readapt.io.checkpoint import Checkpoint
    from stream_readapt.lowrank.lore import classify, tied_head_copy
    from stream_readapt.arch.plan import plan_pairs, roles_of

    phi, theta = Checkpoint.open(m.base), Checkpoint.open(m.instruct)
    pairs = plan_pairs(phi, theta)
    table = roles_of(phi, theta.names)
    targets = classify(pairs, {p.name for p in pairs}, "lora", table)
    return phi, table, targets + tied_head_copy(targets, theta, table)


def test_dense_shortcut_plans_what_the_parameter_split_plans(family):
    """LoRE skips the parameter-target split (a second meta build and PEFT's import) where the
    role table rules experts and routers out; on every dense family the full split agrees."""
    from stream_readapt.lowrank.param_targets import dense_plan, may_have_param_targets, split_param_targets
    from stream_readapt.arch.naming import NameMap

    phi, table, targets = _lore_targets(family)
    assert not may_have_param_targets(targets, table)
    assert split_param_targets(targets, NameMap.from_checkpoint(phi)) == dense_plan(targets)


def test_moe_never_takes_the_dense_shortcut(mixtral):
    from stream_readapt.lowrank.param_targets import may_have_param_targets

    _, table, targets = _lore_targets(mixtral)
    assert may_have_param_targets(targets, table)


@pytest.mark.parametrize("name", [f.name for f in zoo.FAMILIES if f.image_text])
def test_lore_carries_the_vision_towers_delta(name, tmp_path, tmp_path_factory):
    """A multimodal wrapper's vision tower and projector never show in text logits: check their
    weights. PEFT's merge of base + LoRE-Adapter gives the instruct weights, tensor by tensor."""
    models = _models(name, tmp_path_factory)
    extract(models.base, models.instruct, tmp_path / "lore", max_error=1e-4, device="cpu")
    merged = fm.peft_merged_state_dict(models.base, tmp_path / "lore")
    instruct = fm.load_state_dict(models.instruct)
    vision = [k for k in instruct if "visual" in k or "vision" in k or "multi_modal" in k]
    assert len(vision) > 5
    for k in vision:
        assert_rel_close(merged[k], instruct[k], TOL, k)


POINTS = ((0.2, 0.9), (0.7, 0.3))  # (α, β), reached after other set_scales calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cached_and_fused_weights_follow_every_set_scales(family, tmp_path, dtype):
    """Live readaptation, with each layer's weight cached per set_scales (the CPU default) and
    with the terms applied on the fly: after several scale changes, at two (α, β) points, the
    logits of the merged checkpoint of that point (merged in the same dtype)."""
    from stream_readapt import set_scales

    extract(family.base, family.instruct, tmp_path / "lore", max_error=1e-4, device="cpu")
    want = {}
    for a, b in POINTS:
        out = tmp_path / f"merged-{a}-{b}"
        merge(family.base, out, readapter=tmp_path / "lore", knowledge=family.lora, alpha=a, beta=b, device="cpu",
              dtype=str(dtype).replace("torch.", ""))
        want[a, b] = zoo.logits_of(zoo.load(out, dtype), zoo.input_ids())
    tol = TOL if dtype == torch.float32 else 2e-2
    for cached in (True, False):
        model = patch_model(zoo.load(family.base, dtype), readapter=tmp_path / "lore", knowledge=family.lora,
                            alpha=0.0, beta=0.0, cache_weights=cached)
        for a, b in POINTS:
            set_scales(model, alpha=0.9, beta=0.1)
            set_scales(model, alpha=a, beta=b)
            assert_rel_close(zoo.logits_of(model, zoo.input_ids()), want[a, b], tol, f"cached={cached} {a},{b}")
