"""The tensor-role table: derived from the transformers classes, with transformers' own renamings."""

from __future__ import annotations

import json

import pytest

import fixtures_models as fm
import zoo
from stream_readapt.arch import roles
from stream_readapt.arch.roles import Role, role_table

pytest.importorskip("transformers")


def _table(name, tmp_path):
    m = zoo.build_family(zoo.BY_NAME[name], tmp_path)
    return role_table(json.loads((m.base / "config.json").read_text()), fm.checkpoint_keys(m.base))


def test_gpt_neox_head_is_renamed_at_load_and_embedding_found(tmp_path):
    t = _table("gpt_neox", tmp_path)
    head = t.of("embed_out.weight")
    assert head.role is Role.LM_HEAD and head.param == "lm_head.weight" and head.tied_to is None
    assert t.key_of("lm_head.weight") == "embed_out.weight"
    assert t.of("gpt_neox.embed_in.weight").role is Role.EMBEDDING
    assert t.of("gpt_neox.layers.0.input_layernorm.bias").role is Role.NORM
    assert t.of("gpt_neox.layers.0.attention.query_key_value.bias").role is Role.BIAS


def test_gpt2_conv1d_and_tied_head(tmp_path):
    t = _table("gpt2", tmp_path)
    assert t.of("transformer.h.0.attn.c_attn.weight").role is Role.CONV1D
    assert t.of("transformer.h.0.attn.c_attn.weight").transposed
    assert t.lm_head.tied_to == "transformer.wte.weight" and t.embedding_key == "transformer.wte.weight"
    assert t.of("transformer.wpe.weight").role is Role.EMBEDDING


def test_gemma_embedding_records_its_scale(tmp_path):
    t = _table("gemma", tmp_path)
    assert t.of("model.embed_tokens.weight").embed_scale == pytest.approx(48 ** 0.5)
    assert t.of("model.layers.0.input_layernorm.weight").role is Role.NORM


def test_names_only_without_transformers(monkeypatch):
    def missing(_):
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(roles, "meta_build", missing)
    t = role_table({"model_type": "llama", "tie_word_embeddings": True}, ["model.embed_tokens.weight", "x.bias"])
    assert not t.derived and not t.unknown and "not installed" in t.reason
    assert t.lm_head.tied_to == "model.embed_tokens.weight" and t.of("x.bias").role is Role.BIAS
    t.require_classes("merge", names_suffice=True)  # Llama-like names will do
    with pytest.raises(Exception, match="needs the transformers classes"):
        t.require_classes("patch_model")


@pytest.mark.parametrize("config", [{"model_type": "made_up_arch"}, {"model_type": "llama", "num_hidden_layers": 10**7}])
def test_unbuildable_configs_are_unknown_not_guessed(config):
    t = role_table(config, ["model.layers.0.mlp.up_proj.weight"])
    assert not t.derived and t.unknown
    with pytest.raises(Exception, match=r"needs the transformers classes of model_type"):
        t.require_classes("LoRE-Adapt", names_suffice=True)


def test_special_floats_are_decoded_as_transformers_decodes_them():
    """transformers writes Infinity as {"__float__": "Infinity"} (hybrid SSM configs do) and decodes
    it when it reads config.json; the table's meta build must see the float, not the tag."""
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50,
              "rms_norm_eps": {"__float__": "Infinity"}}
    t = role_table(config, ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"])
    assert t.derived and t.of("model.layers.0.self_attn.q_proj.weight").role is Role.LINEAR


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_reach_is_how_peft_itself_wraps_each_parameter(arch):
    """The table's `reach` against PEFT: a MODULE parameter is wrapped by target_modules naming its
    owner; a PARAMETER one only by target_parameters (ParamWrapper), never as a Linear LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper
    from transformers import AutoModelForCausalLM

    import fixtures_moe
    from stream_readapt.arch.table import Reach

    config = fixtures_moe.moe_config(arch)
    torch.manual_seed(0)
    with torch.device("meta"):
        keys = list(AutoModelForCausalLM.from_config(config).state_dict())
    table = role_table(json.loads(config.to_json_string()), keys)
    layer = [k for k in keys if ".layers.1." in k and len(table.params[table.param_of(k)].shape) >= 2]
    reaches = {table.of(k).reach for k in layer}
    assert reaches == {Reach.MODULE, Reach.PARAMETER}  # attention by module; experts and router by parameter
    for key in layer:
        param = table.param_of(key)
        module, _, leaf = param.rpartition(".")
        wrapped = dict(get_peft_model(
            AutoModelForCausalLM.from_config(config),
            LoraConfig(r=2, target_modules=[module]) if table.of(key).reach is Reach.MODULE
            else LoraConfig(r=2, target_modules=[], target_parameters=[param]),
        ).base_model.model.named_modules())[module]
        if table.of(key).reach is Reach.MODULE:
            assert isinstance(wrapped, LoraLayer) and not isinstance(wrapped, ParamWrapper), key
        else:
            assert isinstance(wrapped, ParamWrapper) and wrapped.parameter_name == leaf, key
