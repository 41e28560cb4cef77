"""A knowledge adapter adapts exactly the modules its config selects, as PEFT's loader decides:
`target_modules`, `exclude_modules`, `modules_to_save` and `layers_to_transform` against PEFT's
own `merge_and_unload` of the same folder (tensors for other modules are ignored by both)."""

from __future__ import annotations

import json
import shutil

import pytest

import fixtures_models as fm
from stream_readapt import merge
from stream_readapt.peft_format.targets import adapts_module
from test_merge import assert_matches

CONFIG_EDITS = {  # the lora_adapter fixture ships LoRA tensors on all 7 Llama linears of both layers
    "q only": {"target_modules": ["q_proj"]},
    "regex q|v": {"target_modules": r".*\.(q_proj|v_proj)"},
    "exclude v": {"exclude_modules": ["v_proj"]},
    "layer 1": {"layers_to_transform": [1], "layers_pattern": "layers"},
    "layer 0, any pattern": {"layers_to_transform": 0},
}


@pytest.mark.parametrize("edit", sorted(CONFIG_EDITS))
def test_alpha1_beta0_equals_peft_with_a_narrower_config(llama_pair, lora_adapter, tmp_path, edit):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **CONFIG_EDITS[edit]}))
    merge(llama_pair.base, tmp_path / "out", instruct=llama_pair.instruct, knowledge=adapter, alpha=1, beta=0,
          device="cpu")
    reference = fm.peft_merged_state_dict(llama_pair.base, adapter)
    unchanged = fm.load_state_dict(llama_pair.base)
    touched = {k for k in reference if not reference[k].equal(unchanged[k])}
    assert touched and len(touched) < 14  # the edit narrowed what PEFT adapts: the test compares something
    assert_matches(tmp_path / "out", reference, 1e-6)


@pytest.mark.parametrize("config, module, expected", [
    ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj", True),
    ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.v_proj", False),
    ({"target_modules": ["model.layers.0.self_attn.q_proj"], "layers_to_transform": [1]},
     "model.layers.0.self_attn.q_proj", True),  # a full name is taken before the layer filter, as in PEFT
    ({"target_modules": "all-linear"}, "model.embed_tokens", False),
    ({"target_modules": ["q_proj"], "modules_to_save": ["q_proj"]}, "model.layers.0.self_attn.q_proj", False),
    ({"target_modules": None, "target_parameters": ["mlp.experts.gate_up_proj"]}, "model.layers.0.mlp.up", False),
])
def test_adapts_module_is_pefts_check(config, module, expected):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    embedding = module.endswith("embed_tokens")
    assert adapts_module(config, module, embedding=embedding) is expected
    if not embedding:  # "all-linear" is expanded by PEFT against a model before this check
        assert bool(check_target_module_exists(LoraConfig(**config), module)) is expected
