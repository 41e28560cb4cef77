"""Serving profiles across the model zoo: the `portable` LoRE-Adapter of every family loads in
PEFT and passes vLLM's own checks, and vLLM's scale × B·A is PEFT's Δ module by module."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file

import consumers
import fixtures_models as fm
import zoo
from test_zoo import _models, family  # noqa: F401  (the zoo's family fixture)
from stream_readapt import extract


@pytest.fixture(scope="module")
def vllm():
    return consumers.vllm_lora()


def test_portable_profile_is_served_as_peft_applies_it(family, vllm, tmp_path):  # noqa: F811
    folder = tmp_path / "portable"
    manifest = extract(family.base, family.instruct, folder, energy=0.5, device="cpu", profile="portable")
    helper = vllm.PEFTHelper.from_local_dir(str(folder), max_position_embeddings=64)
    helper.validate_legal(types.SimpleNamespace(max_lora_rank=manifest["profile"]["needs_max_lora_rank"]))
    phi = fm.load_state_dict(family.base)
    merged = fm.peft_merged_state_dict(family.base, folder)  # checkpoint keys, as transformers saves them
    keys = {k.rsplit(".", 1)[0]: k for k in phi}
    table = _table(family)
    names = {r.param.rsplit(".", 1)[0]: r.key for r in table.roles.values()}
    factors = {}
    for key, t in load_file(folder / "adapter_model.safetensors").items():
        module, is_a = vllm.parse_fine_tuned_lora_name(key)  # raises on names vLLM cannot load
        factors.setdefault(module, {})["A" if is_a else "B"] = t.float()
    assert factors
    for module, f in factors.items():
        rank, scaling = helper.get_rank_and_scaling(module)
        assert rank == f["A"].shape[0], module
        key = names.get(module) or keys[module]
        want = merged[key].float() - phi[key].float()
        got = scaling * (f["B"] @ f["A"])
        # vLLM holds GPT-2's Conv1D weights as linear [out, in] ones; the checkpoint stores [in, out]
        got = got.T if table.of(key).transposed else got
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=module)


def _table(family):
    import json

    from stream_readapt.arch.roles import role_table

    return role_table(json.loads((family.base / "config.json").read_text()), fm.checkpoint_keys(family.base))
