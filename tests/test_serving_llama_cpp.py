"""llama.cpp's own converter (convert_lora_to_gguf.py, gguf-py from the llama-cpp-python sdist) on our adapters.

The converted GGUF is read back with gguf-py and each tensor pair is applied with llama.cpp's rule
(llama-adapter.cpp: scale = adapter.lora.alpha / rank of that tensor's lora_a). The converter permutes
q/k rows for RoPE, so the comparison is of Δᵀ·Δ (invariant to a permutation of output rows).
"""

from __future__ import annotations

import pytest
import torch

import consumers
import fixtures_models as fm
from stream_readapt import extract
from stream_readapt.serving.check import check_adapter


@pytest.fixture(scope="module")
def converted(llama_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for profile in ("peft", "llama.cpp", "portable"):
        extract(llama_pair.base, llama_pair.instruct, root / profile, energy=0.5, device="cpu", profile=profile)
        out[profile] = consumers.convert_lora_to_gguf(root / profile, llama_pair.base, root / f"{profile}.gguf")
    extract(llama_pair.base, llama_pair.instruct, root / "peft-lora", energy=0.5, device="cpu", embeddings="lora")
    out["peft-lora"] = consumers.convert_lora_to_gguf(root / "peft-lora", llama_pair.base, root / "peft-lora.gguf")
    return root, out


def test_converter_stops_on_the_peft_adapter_and_check_says_so(converted):
    root, runs = converted
    assert runs["peft"].returncode != 0 and "Not a lora_A or lora_B tensor" in runs["peft"].stderr
    assert any("convert_lora_to_gguf.py stops" in r for r in check_adapter(root / "peft", "llama.cpp"))


def _llama_cpp_deltas(gguf_path) -> dict[str, torch.Tensor]:
    gguf = consumers.gguf_module()
    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b = tensors[name[: -1] + "b"]  # numpy order: [out, r]; llama-adapter.h: rank = b->ne[0]
            scale = alpha / b.shape[1]
            # llm_graph_context::build_inp_embd: rows of lora_a per token times lora_bᵀ
            out[name.removesuffix(".lora_a")] = scale * (a @ b.T if name.startswith("token_embd") else b @ a)
    return out


@pytest.mark.parametrize("profile, scaled_as_peft", [("llama.cpp", True), ("portable", True), ("peft-lora", False)])
def test_llama_cpp_applies_peft_delta(llama_pair, converted, profile, scaled_as_peft):
    root, runs = converted
    assert runs[profile].returncode == 0, runs[profile].stderr[-2000:]
    gguf = consumers.gguf_module()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    merged, phi = fm.peft_merged_state_dict(llama_pair.base, root / profile), fm.load_state_dict(llama_pair.base)
    deltas = _llama_cpp_deltas(root / f"{profile}.gguf")
    assert len(deltas) >= 14
    agree = []
    for key in phi:
        target = names.get_name(key, try_suffixes=(".weight",))
        if target is None or target not in deltas:
            continue
        ref = (merged[key] - phi[key].float()).double()
        got = deltas[target].double()
        agree.append(torch.allclose(got.T @ got, ref.T @ ref, rtol=1e-4, atol=1e-9))
    assert all(agree) if scaled_as_peft else not all(agree)  # PEFT's own layout: wrong scale per module
    if not scaled_as_peft:
        assert any("scaled unlike PEFT" in r for r in check_adapter(root / profile, "llama.cpp"))
