"""`patch_model` / `set_scales`: a live readapted model gives the merged checkpoint's logits."""

from __future__ import annotations

import pytest
import torch

from stream_readapt import extract, merge, patch_model, set_scales
from stream_readapt.live.patch import ReadaptEmbedding, ReadaptLinear, recorded_base_norms
from stream_readapt.io.safetensors_reader import CheckpointError

IDS = torch.tensor([[1, 5, 9, 42, 7, 299, 3, 17]])


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def run(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def readapters(llama_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("readapters")
    extract(llama_pair.base, llama_pair.instruct, root / "full", dtype="float32", device="cpu")
    extract(llama_pair.base, llama_pair.instruct, root / "lore", energy=0.5, device="cpu")
    extract(llama_pair.base, llama_pair.instruct, root / "lore-emb", rank=6, embeddings="lora", device="cpu")
    return root


@pytest.mark.parametrize("kind", ["full", "lore", "lore-emb"])
@pytest.mark.parametrize("adapter", ["lora", "dora", "rslora"])
def test_patched_logits_equal_merged_checkpoint(llama_pair, readapters, request, tmp_path, kind, adapter):
    knowledge = request.getfixturevalue(f"{adapter}_adapter")
    merged = tmp_path / "merged"
    merge(llama_pair.base, merged, readapter=readapters / kind, knowledge=knowledge, alpha=0.5, beta=0.5, device="cpu")
    model = patch_model(load(llama_pair.base), readapter=readapters / kind, knowledge=knowledge, alpha=0.5, beta=0.5)
    assert any(isinstance(m, ReadaptLinear) for m in model.modules())
    torch.testing.assert_close(run(model), run(load(merged)), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", ["lore", "full"])
def test_set_scales_is_live(llama_pair, readapters, dora_adapter, tmp_path, kind):
    model = patch_model(load(llama_pair.base), readapter=readapters / kind, knowledge=dora_adapter)
    for alpha, beta in ((0.0, 1.0), (1.0, 0.0), (0.3, 0.8), (-0.5, 1.5)):
        merge(llama_pair.base, tmp_path / f"m{alpha}{beta}", readapter=readapters / kind, knowledge=dora_adapter,
              alpha=alpha, beta=beta, device="cpu")
        set_scales(model, alpha, beta)
        torch.testing.assert_close(run(model), run(load(tmp_path / f"m{alpha}{beta}")), rtol=2e-4, atol=2e-4)
    set_scales(model, 0.0, 0.0)
    torch.testing.assert_close(run(model), run(load(llama_pair.base)), rtol=1e-5, atol=1e-5)


def test_full_readapter_layers_hold_no_merged_copy(llama_pair, readapters, lora_adapter):
    """A full Δ is handed to the kernel with β as its scale: no second weight-sized tensor per
    layer, and set_scales allocates none."""
    model = patch_model(load(llama_pair.base), readapter=readapters / "full", knowledge=lora_adapter)
    layers = [m for m in model.modules() if isinstance(m, ReadaptLinear)]
    assert layers and all(m.delta is m.terms.full["beta"] for m in layers)
    set_scales(model, 0.2, 0.9)
    assert all(m.delta is m.terms.full["beta"] and m.delta_scale == 0.9 for m in layers)


def test_embedding_lora_patches_embedding(llama_pair, readapters, rslora_adapter):
    model = patch_model(load(llama_pair.base), readapter=readapters / "lore-emb", knowledge=rslora_adapter)
    assert isinstance(model.get_input_embeddings(), ReadaptEmbedding)


def test_tied_qwen_with_biases(qwen_tied_pair, qwen_lora_adapter, tmp_path):
    extract(qwen_tied_pair.base, qwen_tied_pair.instruct, tmp_path / "lore", energy=0.9, device="cpu")
    merge(qwen_tied_pair.base, tmp_path / "merged", readapter=tmp_path / "lore", knowledge=qwen_lora_adapter, device="cpu")
    model = patch_model(load(qwen_tied_pair.base), readapter=tmp_path / "lore", knowledge=qwen_lora_adapter)
    torch.testing.assert_close(run(model), run(load(tmp_path / "merged")), rtol=2e-4, atol=2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["full", "lore"])
def test_patched_on_cuda_runs_triton_kernels(llama_pair, readapters, dora_adapter, tmp_path, kind):
    """On CUDA the patched layers run the Triton kernels (fp32, IEEE dots): same logits as the merge."""
    merge(llama_pair.base, tmp_path / "merged", readapter=readapters / kind, knowledge=dora_adapter, device="cpu")
    model = patch_model(load(llama_pair.base).cuda(), readapter=readapters / kind, knowledge=dora_adapter)
    with torch.no_grad():
        got = model(input_ids=IDS.cuda()).logits.cpu()
    torch.testing.assert_close(got, run(load(tmp_path / "merged")), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", ["full", "lore"])
def test_refuses_a_readapter_of_another_base(llama_pair, readapters, kind, caplog):
    """The instruct model has the base's names and shapes: only the recorded weight norms tell."""
    with pytest.raises(CheckpointError, match="extracted from another base.*ignore_base_mismatch"):
        patch_model(load(llama_pair.instruct), readapter=readapters / kind)
    model = patch_model(load(llama_pair.instruct), readapter=readapters / kind, ignore_base_mismatch=True)
    assert any(isinstance(m, ReadaptLinear) for m in model.modules()) and "another base" in caplog.text


def test_refuses_adapters_that_do_not_fit(llama_pair, qwen_tied_pair, lora_adapter, tmp_path):
    extract(qwen_tied_pair.base, qwen_tied_pair.instruct, tmp_path / "qwen-re", device="cpu")
    with pytest.raises(CheckpointError, match="k_proj.bias' has no counterpart"):
        patch_model(load(llama_pair.base), readapter=tmp_path / "qwen-re")  # same sizes, Qwen's biases
    from transformers import AutoConfig, AutoModelForCausalLM

    narrow = AutoConfig.from_pretrained(llama_pair.base, intermediate_size=160)  # MLP 160 wide, not 176
    with pytest.raises(CheckpointError, match="down_proj.*do not fit the base weight"):
        patch_model(AutoModelForCausalLM.from_config(narrow), knowledge=lora_adapter)
    model = patch_model(load(llama_pair.base), knowledge=lora_adapter)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, knowledge=lora_adapter)


def test_recorded_base_norms_from_old_manifests(llama_pair, readapters):
    import json

    manifest = json.loads((readapters / "full" / "manifest.json").read_text())
    now = recorded_base_norms(manifest)
    for rec in manifest["tensors"].values():  # before base_norm was recorded: ‖Δ‖ / (‖Δ‖/‖Φ‖)
        rec.pop("base_norm")
    old = recorded_base_norms(manifest)
    assert set(old) == set(now) and all(abs(old[k] - now[k]) <= 1e-9 * now[k] for k in now)
    phi = load(llama_pair.base).state_dict()
    assert all(abs(float(phi[k].norm()) - v) <= 1e-5 * v for k, v in now.items())
    lore = recorded_base_norms(json.loads((readapters / "lore" / "manifest.json").read_text()))
    assert len(lore) == 14 and all(abs(float(phi[k].norm()) - v) <= 1e-5 * v for k, v in lore.items())


def test_set_scales_needs_a_patched_model(llama_pair):
    with pytest.raises(ValueError, match="patch_model first"):
        set_scales(load(llama_pair.base), 0.5, 0.5)


def test_a_term_with_nowhere_to_go_is_refused_not_dropped(llama_pair, readapters):
    """A layer patch_model must not wrap (a Linear subclass with a forward of its own, as a
    family's router) keeps its Δ nowhere: one line naming it, and the model left untouched
    (the Δ was once dropped without a word)."""
    from transformers import AutoModelForCausalLM

    class TupleLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x), None

    model = AutoModelForCausalLM.from_pretrained(llama_pair.base, dtype=torch.float32)
    old = model.model.layers[0].mlp.down_proj
    odd = TupleLinear(old.in_features, old.out_features, bias=False)
    odd.weight = old.weight
    model.model.layers[0].mlp.down_proj = odd
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: the adapters change it"):
        patch_model(model, readapter=readapters / "lore")
    assert not any(isinstance(m, (ReadaptLinear, ReadaptEmbedding)) for m in model.modules())


def test_no_false_another_base_warning_for_the_base_it_was_made_on(llama_pair, readapters, lora_adapter, caplog):
    """Every patch_model call warned that the adapter may be for another base (a loaded model's
    class name compared with the adapter's base path); the loaded model's own path is compared now."""
    with caplog.at_level("WARNING"):
        patch_model(load(llama_pair.base), readapter=readapters / "lore", knowledge=lora_adapter)
    assert "is this adapter for that base" not in caplog.text
