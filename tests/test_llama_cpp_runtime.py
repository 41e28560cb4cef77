"""llama.cpp itself, at run time: logits of base + our LoRE-Adapter in llama.cpp against PEFT's.

libllama is built from the llama-cpp-python 0.3.36 sdist (`consumers.llama_cpp_runtime`, once per
machine, cached) and driven through llama-cpp-python's own ctypes bindings. The tiny Llama here
has a SentencePiece tokenizer trained at test time, which is what llama.cpp's
convert_hf_to_gguf.py accepts; the base goes to GGUF f32 with that converter, the `llama.cpp`
profile adapter with convert_lora_to_gguf.py, and llama.cpp applies it at scale 1.
"""

from __future__ import annotations

import copy
import ctypes
import io
import json
import random

import numpy as np
import pytest
import torch

import consumers
import fixtures_models as fm
from stream_readapt import extract

pytestmark = pytest.mark.slow

VOCAB = 300
TEXT_SEED = 0


def _corpus(seed: int = TEXT_SEED) -> list[str]:
    """Lines of made-up words (syllables of a small alphabet), enough for 300 BPE pieces."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(2000)]


def _train_sentencepiece(lines: list[str]) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2)
    return buf.getvalue()


def _save_tokenizer(spm_model: bytes, out) -> None:
    """tokenizer.model (what convert_hf_to_gguf.py reads) + the HF LlamaTokenizer of the same pieces."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    (out / "tokenizer.model").write_bytes(spm_model)
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), pad_token="<pad>").save_pretrained(out)


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory):
    """Llama base (random init) + instruct (a few AdamW steps), fp32, SentencePiece tokenizer."""
    pytest.importorskip("sentencepiece")
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama_spm")
    spm_model = _train_sentencepiece(_corpus())
    with fm.single_thread():
        torch.manual_seed(0)
        base = LlamaForCausalLM(fm._llama_config(vocab_size=VOCAB)).eval()
        instruct = fm.train_steps(copy.deepcopy(base), seed=1, vocab=VOCAB)
    pair = fm.ModelPair(root / "base", root / "instruct")
    for model, path in ((base, pair.base), (instruct, pair.instruct)):
        model.save_pretrained(path, safe_serialization=True)
        _save_tokenizer(spm_model, path)
    return pair, spm_model


class LlamaCpp:
    """One GGUF model in llama.cpp (CPU), optionally with LoRA adapters at given scales."""

    def __init__(self, lib, model_path):
        self.lib = lib
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(model_path).encode(), params)
        assert self.model, f"llama.cpp could not load {model_path}"
        self.adapters = []

    def lora(self, path):
        adapter = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
        assert adapter, f"llama.cpp could not load the LoRA {path}"
        self.adapters.append(adapter)
        return adapter

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        vocab = self.lib.llama_model_get_vocab(self.model)
        buf = (self.lib.llama_token * 512)()
        n = self.lib.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 512, add_bos, False)
        assert n >= 0
        return list(buf[:n])

    def logits(self, ids: list[int], loras=(), *, f32: bool = True) -> np.ndarray:
        """[len(ids), n_vocab] float32 logits, every position output (one sequence, one batch).

        f32: an f32 KV cache and no flash attention; False keeps llama.cpp's defaults (f16 KV
        cache, flash attention chosen automatically: on for the CPU), which round to f16.
        """
        lib, n = self.lib, len(ids)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(n, 32)
        cparams.n_threads = cparams.n_threads_batch = 1
        if f32:
            cparams.type_k = cparams.type_v = lib.GGML_TYPE_F32
            cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(self.model, cparams)
        assert ctx
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            if loras:
                arr = (lib.llama_adapter_lora_p_ctypes * len(loras))(*[a for a, _ in loras])
                scales = (ctypes.c_float * len(loras))(*[s for _, s in loras])
                assert lib.llama_set_adapters_lora(ctx, arr, len(loras), scales) == 0
            batch.n_tokens = n
            for i, tok in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, 1
            assert lib.llama_decode(ctx, batch) == 0
            n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
            ptr = lib.llama_get_logits(ctx)
            return np.ctypeslib.as_array(ptr, shape=(n, n_vocab)).copy()
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)

    def close(self):
        for adapter in self.adapters:
            self.lib.llama_adapter_lora_free(adapter)
        self.lib.llama_model_free(self.model)


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@torch.no_grad()
def _peft_logits(base_dir, adapter_dir, ids) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with fm.single_thread():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_llama_cpp_logits_with_lore_adapter_match_peft(spm_pair, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    lib = consumers.llama_cpp_runtime()
    pair, spm_model = spm_pair
    adapter = tmp_path / "lore"
    manifest = extract(pair.base, pair.instruct, adapter, energy=0.5, device="cpu", profile="llama.cpp")
    ranks = {m["rank"] for m in manifest["modules"].values() if "rank" in m}
    assert len(ranks) > 1  # per-module ranks: the case llama.cpp scales by each tensor's own rank
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    done = consumers.convert_hf_to_gguf(pair.base, tmp_path / "base.gguf", "f32")
    assert done.returncode == 0, done.stderr[-3000:]
    done = consumers.convert_lora_to_gguf(adapter, pair.base, tmp_path / "lore.gguf")
    assert done.returncode == 0, done.stderr[-3000:]

    text = " ".join(_corpus(seed=1)[:3])  # unseen lines of the same made-up language
    pieces = spm.SentencePieceProcessor(model_proto=spm_model).encode(text)
    ids = [1] + pieces[:63]
    # the HF tokenizer saved beside tokenizer.model agrees with SentencePiece
    assert AutoTokenizer.from_pretrained(pair.base)(text, add_special_tokens=False).input_ids == pieces
    llama = LlamaCpp(lib, tmp_path / "base.gguf")
    try:
        # llama.cpp's tokenizer (from the GGUF the converter wrote) agrees with SentencePiece
        assert llama.tokenize(text)[: len(ids)] == ids
        lora = llama.lora(tmp_path / "lore.gguf")
        cpp_base = llama.logits(ids)
        cpp_lore = llama.logits(ids, loras=[(lora, 1.0)])
        cpp_lore_default = llama.logits(ids, loras=[(lora, 1.0)], f32=False)
    finally:
        llama.close()
    peft_base = _peft_logits(pair.base, None, ids)
    peft_lore = _peft_logits(pair.base, adapter, ids)
    instruct = fm.logits(pair.instruct, torch.tensor([ids]))[0].numpy()

    err_base, err = _rel(cpp_base, peft_base), _rel(cpp_lore, peft_lore)
    err_default = _rel(cpp_lore_default, peft_lore)
    shift = _rel(cpp_lore, cpp_base)  # what the adapter changes in llama.cpp
    print(f"\nllama.cpp vs PEFT, rel. Frobenius error of logits over {len(ids)} positions: base {err_base:.2e}, "
          f"base+LoRE {err:.2e} (llama.cpp's default f16 KV cache + flash attention: {err_default:.2e}); "
          f"adapter shift {shift:.2e}; base+LoRE vs instruct {_rel(cpp_lore, instruct):.2e}; "
          f"ranks {sorted(ranks)}")
    # Measured 2.4e-7 / 2.6e-7 (fp32 rounding; float32 eps is 1.2e-7): 1e-5 leaves 40x headroom
    # for other CPUs' summation orders and is still 5 orders below what the adapter changes.
    assert err_base < 1e-5
    assert err < 1e-5
    assert err_default < 2e-3  # measured 3.3e-4: f16 rounding of K, V and Q
    assert shift > 1e4 * err  # the adapter does something llama.cpp must get right (measured 1.49)
