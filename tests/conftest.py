"""Shared pytest fixtures: tiny real checkpoints built once per session (see fixtures_models).

Pairs are `ModelPair(base: Path, instruct: Path)`; adapters are adapter folder `Path`s.
Nothing is downloaded: transformers / peft build and train everything locally in a few
seconds. Tests that use none of these fixtures never import transformers.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton picks interpreter or compiler when it is first imported: without a GPU, make
# that the interpreter for the whole session so the kernel tests run on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Role tables are derived afresh in every test (and child process): a table cached by one
# test, or by the user's own runs, would hide what another test changes. tests/test_role_cache.py
# switches the cache on where it is the subject.
os.environ["STREAM_READAPT_CACHE"] = "off"

import fixtures_models as fm
from fixtures_models import ModelPair


def _needs_hf() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> ModelPair:
    """Untied Llama fp32: base sharded (3 shards + index), instruct single file + chat template."""
    _needs_hf()
    return fm.build_llama_pair(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen_tied_pair(tmp_path_factory) -> ModelPair:
    """Qwen2 fp32 with tie_word_embeddings=True (no lm_head.weight stored), q/k/v biases."""
    _needs_hf()
    return fm.build_qwen_tied_pair(tmp_path_factory.mktemp("qwen_tied"))


@pytest.fixture(scope="session")
def llama_added_tokens_pair(llama_pair, tmp_path_factory) -> ModelPair:
    """llama_pair.base + an instruct with vocab 303 (ADDED_TOKENS at ids 300..302)."""
    out = tmp_path_factory.mktemp("llama_added") / "instruct"
    return ModelPair(llama_pair.base, fm.build_added_tokens_instruct(llama_pair.base, out))


@pytest.fixture(scope="session")
def llama_pair_bf16(llama_pair, tmp_path_factory) -> ModelPair:
    """llama_pair cast to bf16 (base still sharded, instruct single file)."""
    return fm.build_bf16_pair(llama_pair, tmp_path_factory.mktemp("llama_bf16"))


def _adapter(tmp_path_factory, base, name: str):
    return fm.build_adapter(base, tmp_path_factory.mktemp(name) / name, fm.lora_configs()[name])


@pytest.fixture(scope="session")
def lora_adapter(llama_pair, tmp_path_factory):
    """LoRA r=8, alpha=16 on all 7 Llama linears of llama_pair.base."""
    return _adapter(tmp_path_factory, llama_pair.base, "lora")


@pytest.fixture(scope="session")
def rslora_adapter(llama_pair, tmp_path_factory):
    """rsLoRA r=8 with rank/alpha patterns, embed_tokens LoRA and lm_head modules_to_save."""
    return _adapter(tmp_path_factory, llama_pair.base, "rslora")


@pytest.fixture(scope="session")
def dora_adapter(llama_pair, tmp_path_factory):
    """DoRA r=4, alpha=8 on q/v/up/down; magnitudes trained away from the base row norms."""
    return _adapter(tmp_path_factory, llama_pair.base, "dora")


@pytest.fixture(scope="session")
def qwen_lora_adapter(qwen_tied_pair, tmp_path_factory):
    """LoRA r=8, alpha=16 on q/v/o of qwen_tied_pair.base."""
    return _adapter(tmp_path_factory, qwen_tied_pair.base, "qwen_lora")
