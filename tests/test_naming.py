"""Checkpoint keys <-> model parameters, checked against what transformers actually loads."""

import pytest
import torch

from fixtures_moe import MOE_ARCHS, build_moe_pair
from fixtures_models import build_llama_pair
from stream_readapt.io.checkpoint import Checkpoint
from stream_readapt.arch.naming import NameMap


@pytest.fixture(scope="module")
def moe_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_naming")
    return {arch: build_moe_pair(arch, root / arch) for arch in MOE_ARCHS}


def _assemble(ckpt: Checkpoint, names: NameMap, param: str) -> torch.Tensor:
    pieces = names.keys_of(param)
    if pieces[0].expert is None:
        return ckpt.read(pieces[0].key)
    experts = sorted({p.expert for p in pieces})
    return torch.stack([torch.cat([ckpt.read(p.key) for p in pieces if p.expert == e]) for e in experts])


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_parameter_assembles_as_transformers_loads_it(moe_pairs, arch):
    from transformers import AutoModelForCausalLM

    folder = moe_pairs[arch].base
    state = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    with Checkpoint.from_folder(folder) as ckpt:
        names = NameMap.from_checkpoint(ckpt)
        assert set(names.pieces) == set(ckpt.names)  # every key placed exactly once
        assert {names.param_of(k) for k in ckpt.names} == set(state)
        for param, tensor in state.items():
            assert torch.equal(_assemble(ckpt, names, param), tensor), param
    fused = {p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in names.fused}
    assert fused == (set() if arch == "gpt_oss" else {"experts.gate_up_proj", "experts.down_proj"})


def test_mixtral_piece_positions(moe_pairs):
    with Checkpoint.from_folder(moe_pairs["mixtral"].base) as ckpt:
        names = NameMap.from_checkpoint(ckpt)
    w3 = names.pieces["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert (w3.param, w3.expert, w3.row0, w3.rows) == ("model.layers.1.mlp.experts.gate_up_proj", 2, 40, 40)
    assert names.params["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 80, 64)
    assert not names.params["model.layers.1.mlp.experts.down_proj"].transposed


def test_gpt_oss_experts_are_transposed(moe_pairs):
    with Checkpoint.from_folder(moe_pairs["gpt_oss"].base) as ckpt:
        names = NameMap.from_checkpoint(ckpt)
    assert names.params["model.layers.0.mlp.experts.gate_up_proj"].transposed


def test_dense_model_is_the_identity(tmp_path):
    pair = build_llama_pair(tmp_path)
    with Checkpoint.from_folder(pair.base) as ckpt:
        names = NameMap.from_checkpoint(ckpt)
        assert all(names.param_of(k) == k for k in ckpt.names) and not names.fused
