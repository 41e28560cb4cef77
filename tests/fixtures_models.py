r"""Tiny real checkpoints built with transformers + peft, and float64 reference helpers.

Everything here is independent of `stream_readapt`: plain functions that write Hugging
Face folders (random init with a fixed seed, a few AdamW steps on random tokens) and
compute the expected answers with transformers / peft, so tests, `bench/` and the demo
can reuse them (`python tests/fixtures_models.py OUT_DIR` builds them all).

Model sizes: hidden 64, intermediate 176, 2 layers, 4 heads, 2 kv heads (head_dim 16,
so k/v_proj are [32, 64]), vocab 300 (+3 for the added-tokens instruct), fp32 unless
noted. Tensor names are the usual transformers ones, e.g.
`model.layers.0.self_attn.q_proj.weight`, `model.embed_tokens.weight`, `lm_head.weight`
(absent from the tied Qwen2 checkpoints), Qwen2 also has `...{q,k,v}_proj.bias`.

PEFT adapter tensors (`adapter_model.safetensors`, peft 0.21; the adapter name
"default" is stripped on save, keys are prefixed with `base_model.model.`):

- LoRA linear:   `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`  [r, in]
                 `base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight`  [out, r]
- DoRA adds:     `base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector` [out]
                 (no `.weight` suffix in the file; in the live module it is
                 `...lora_magnitude_vector.default.weight`)
- LoRA embedding: `base_model.model.model.embed_tokens.lora_embedding_A` [r, vocab]
                 `base_model.model.model.embed_tokens.lora_embedding_B` [hidden, r]
                 (no `.weight` suffix; Ψ = s·(B·A)ᵀ, shape [vocab, hidden])
- modules_to_save: `base_model.model.lm_head.weight` — the full trained replacement,
                 saved under the original module name (no `modules_to_save.` in the key).
- embed_tokens as a target also makes PEFT (save_embedding_layers="auto") store the whole
  base embedding as `base_model.model.model.embed_tokens.base_layer.weight` [vocab, hidden];
  PEFT loads it back over the base's, so it acts like a modules_to_save entry (here it
  equals Φ, hence contributes nothing).
- Bias tensors (`...q_proj.bias` in Qwen2) are never touched by these adapters.

`adapter_config.json` carries `r`, `lora_alpha`, `use_rslora`, `use_dora`,
`target_modules` (a list or a regex string), `rank_pattern`, `alpha_pattern` and
`modules_to_save` as given to LoraConfig (pattern keys unchanged, matched by PEFT as
`re.match(rf"(.*\.)?({pattern})$", module_name)`, first match wins), plus
`base_model_name_or_path` = the base folder. `target_modules` is written in set order,
so adapter_config.json is not byte-stable across processes; every weight file is.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

VOCAB = 300
ADDED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|pad|>")
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
ROLES = ("system", "user", "assistant")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant{% endif %}")
IM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}"
               "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant"
               "{% endif %}")
SHARD_SIZE = "200KB"  # the fp32 llama base is ~0.6 MB, so this gives 3+ shards


@dataclass(frozen=True)
class ModelPair:
    """A pretrained base and its instruction-tuned variant, as checkpoint folders."""

    base: Path
    instruct: Path


@dataclass(frozen=True)
class Corrupted:
    """What `corrupt_copy` broke: the folder, the file touched and the tensor (if one)."""

    dir: Path
    file: str
    key: str | None = None


# ----------------------------------------------------------------------------- builders

class single_thread(contextlib.ContextDecorator):
    """Run torch on one thread: tiny matmuls gain nothing from more, and on a busy
    2-core box OpenMP spin-waits made the builds ~12x slower (2 s vs 28 s)."""

    def __enter__(self):
        self._n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self._n)
        return False


def model_class(folder):
    """The transformers class a checkpoint was saved from (`architectures[0]`), else
    AutoModelForCausalLM: multimodal wrappers load as themselves."""
    import transformers

    arch = (json.loads((Path(folder) / "config.json").read_text()).get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    return cls if cls is not None else transformers.AutoModelForCausalLM


def build_tokenizer(*, chat_template: str | None = None, added_tokens: bool = False):
    """A WordLevel tokenizer over `<unk> <s> </s> <pad> system user assistant w0..w292`.

    Args:
        chat_template: jinja template stored on the tokenizer (None: no template).
        added_tokens: also add `ADDED_TOKENS` as special tokens (ids 300, 301, 302),
            with `<|im_end|>` as eos and `<|pad|>` as pad.
    Returns:
        A `transformers.PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + list(ROLES)
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    if added_tokens:
        fast.add_tokens(list(ADDED_TOKENS), special_tokens=True)
        fast.eos_token, fast.pad_token = "<|im_end|>", "<|pad|>"
    fast.chat_template = chat_template
    return fast


def _llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlamaConfig(**{**kw, **overrides})


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=176,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


@single_thread()
def train_steps(model, *, steps: int = 4, lr: float = 1e-2, seed: int = 0, vocab: int = VOCAB):
    """A few AdamW steps of next-token loss on random token batches [4, 16], in place."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def _save(model, tokenizer, out: Path, *, max_shard_size: str = "50GB") -> Path:
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out


def _instruct_generation_config(eos_token_id):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=3,
                            do_sample=True, temperature=0.7, top_p=0.9)


@single_thread()
def build_llama_pair(root: str | Path, *, seed: int = 0) -> ModelPair:
    """Untied Llama base (sharded, no chat template) + instruct (single file, chat
    template, generation_config with do_sample/temperature 0.7/top_p 0.9, eos [2])."""
    from transformers import LlamaForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(_llama_config()).eval()
    _save(base, build_tokenizer(), root / "base", max_shard_size=SHARD_SIZE)
    instruct = train_steps(copy.deepcopy(base), seed=seed + 1)
    instruct.generation_config = _instruct_generation_config([2])
    _save(instruct, build_tokenizer(chat_template=CHAT_TEMPLATE), root / "instruct")
    return ModelPair(root / "base", root / "instruct")


@single_thread()
def build_qwen_tied_pair(root: str | Path, *, seed: int = 1) -> ModelPair:
    """Qwen2 base + instruct with tie_word_embeddings=True (no `lm_head.weight` saved)."""
    from transformers import Qwen2ForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    base = Qwen2ForCausalLM(_qwen2_config()).eval()
    _save(base, build_tokenizer(), root / "base")
    instruct = train_steps(copy.deepcopy(base), seed=seed + 1)
    _save(instruct, build_tokenizer(chat_template=CHAT_TEMPLATE), root / "instruct")
    return ModelPair(root / "base", root / "instruct")


@single_thread()
def build_added_tokens_instruct(base_dir: str | Path, out: str | Path, *, seed: int = 2) -> Path:
    """Instruct = base resized to VOCAB + 3 (`ADDED_TOKENS`), trained so new rows move."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(VOCAB + len(ADDED_TOKENS), mean_resizing=False)
    train_steps(model, seed=seed, vocab=VOCAB + len(ADDED_TOKENS))
    model.generation_config = _instruct_generation_config([2, VOCAB + 1])
    tok = build_tokenizer(chat_template=IM_TEMPLATE, added_tokens=True)
    return _save(model, tok, Path(out))


@single_thread()
def cast_copy(src: str | Path, out: str | Path, dtype: torch.dtype, *,
              max_shard_size: str = "50GB") -> Path:
    """Re-save checkpoint `src` in `dtype` (e.g. bf16), tokenizer files copied along."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, out / name)
    return out


def build_bf16_pair(pair: ModelPair, root: str | Path) -> ModelPair:
    """bf16 copies of a fp32 pair (base sharded at 100KB, instruct single file)."""
    root = Path(root)
    base = cast_copy(pair.base, root / "base", torch.bfloat16, max_shard_size="100KB")
    return ModelPair(base, cast_copy(pair.instruct, root / "instruct", torch.bfloat16))


# ----------------------------------------------------------------------------- adapters

def lora_configs() -> dict:
    """The knowledge-adapter LoraConfigs by name: lora, rslora, dora, qwen_lora."""
    from peft import LoraConfig

    return {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
        "rslora": LoraConfig(r=8, lora_alpha=16, use_rslora=True,
                             target_modules=ALL_LINEAR + ["embed_tokens"],
                             rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12},
                             alpha_pattern={"v_proj": 3}, modules_to_save=["lm_head"]),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        "qwen_lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    }


def _randomize_zero_lora(model, std: float = 0.02) -> None:
    """PEFT starts B (or embedding A) at zero; make every factor non-zero before training."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "magnitude" not in name and not p.any():
                p.normal_(0.0, std)


@single_thread()
def build_adapter(base_dir: str | Path, out: str | Path, config, *, seed: int = 3,
                  steps: int = 4, lr: float = 1e-2) -> Path:
    """Train a PEFT adapter (`config`: a LoraConfig) on `base_dir` for a few steps; save it.

    Example:
        build_adapter(pair.base, tmp / "lora", lora_configs()["lora"])
    """
    from peft import get_peft_model
    torch.manual_seed(seed)
    base = model_class(base_dir).from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, copy.deepcopy(config))
    _randomize_zero_lora(model)
    train_steps(model, steps=steps, lr=lr, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    return Path(out)


# ----------------------------------------------------------------------------- references

def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (index order) or the file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text())["weight_map"].values()
        return [path / n for n in sorted(set(names))]
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (path / name).exists():
            return [path / name]
    raise FileNotFoundError(f"{path}: no model.safetensors, index or adapter_model.safetensors")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (folder, single file or sharded), as stored."""
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        out.update(load_file(f))
    return out


def checkpoint_keys(path: str | Path) -> list[str]:
    """Tensor names of a checkpoint, without reading the data."""
    keys = []
    for f in checkpoint_files(path):
        with safe_open(f, framework="pt") as fh:
            keys.extend(fh.keys())
    return keys


@single_thread()
def peft_merged_state_dict(base_dir: str | Path, adapter_dir: str | Path, *,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`PeftModel.from_pretrained(base).merge_and_unload().state_dict()`, loaded in `dtype`.

    Only keys stored in the base checkpoint are kept (a tied model's live state_dict also
    has `lm_head.weight`, aliasing the embeddings).
    """
    from peft import PeftModel

    import tempfile

    base = model_class(base_dir).from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    # save_pretrained writes checkpoint keys (transformers reverts its load-time renamings,
    # e.g. GPT-NeoX's lm_head -> embed_out), which is what a merged checkpoint must hold.
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        state = load_state_dict(tmp)
    return {k: state[k].clone() for k in checkpoint_keys(base_dir)}


def _grow_rows(phi: torch.Tensor, theta: torch.Tensor, key: str, extra_rows: str) -> torch.Tensor:
    """Φ padded with Θ's extra rows (so Δ = 0 there and Ω takes Θ's new rows)."""
    if extra_rows != "instruct" or phi.shape[1:] != theta.shape[1:] or len(phi) > len(theta):
        raise ValueError(f"{key}: base shape {tuple(phi.shape)} != instruct {tuple(theta.shape)}"
                         " (pass extra_rows='instruct' for an instruct vocabulary extension)")
    return torch.cat([phi, theta[len(phi):]])


def reference_readapt_float64(base_dir, instruct_dir, adapter_dir=None, alpha: float = 0.5,
                              beta: float = 0.5, *, extra_rows: str = "error"
                              ) -> dict[str, torch.Tensor]:
    """Ω = Φ + α·Ψ + β·Δ per base tensor, in float64.

    Ψ = PEFT's merged weight − Φ, with the PEFT merge itself done in float64 (the base
    loaded as float64, the adapter factors upcast); Δ = Θ − Φ.

    Args:
        extra_rows: "error" refuses base/instruct shape mismatches; "instruct" handles a
            vocabulary extension: rows the instruct model added are taken from Θ as they
            are (Ψ and Δ are zero there).
    Returns:
        {name: float64 tensor} with the base checkpoint's names and instruct's shapes.
    """
    phi = {k: v.double() for k, v in load_state_dict(base_dir).items()}
    theta = load_state_dict(instruct_dir)
    merged = peft_merged_state_dict(base_dir, adapter_dir, dtype=torch.float64) if adapter_dir else phi
    out = {}
    for key, p in phi.items():
        psi = merged[key].double() - p
        t = theta[key].double()
        if t.shape != p.shape:
            grown = _grow_rows(p, t, key, extra_rows)
            psi = torch.cat([psi, psi.new_zeros((len(t) - len(p),) + p.shape[1:])])
            p = grown
        out[key] = p + alpha * psi + beta * (t - p)
    return out


@single_thread()
@torch.no_grad()
def logits(model_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of `AutoModelForCausalLM.from_pretrained(model_dir)` on `input_ids`."""
    model = model_class(model_dir).from_pretrained(model_dir, dtype=torch.float32).eval()
    return model(input_ids=input_ids).logits


# ----------------------------------------------------------------------------- bad inputs

CORRUPT_MODES = ("truncate", "bad_header", "escape_index", "nan", "missing_tensor", "bin_only")


def _first_matrix(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if tensors[k].ndim == 2)


def _rewrite(file: Path, edit) -> str:
    """Load a shard, let `edit(tensors) -> key` change it, save it back; returns key."""
    tensors = load_file(file)
    key = edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return key


def _set_nan(tensors):
    key = _first_matrix(tensors)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    return key


def _drop(tensors):
    key = _first_matrix(tensors)
    del tensors[key]
    return key


def _bad_header(file: Path) -> None:
    raw = bytearray(file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8:8 + n] = b'{"not": json,'.ljust(n, b" ")
    file.write_bytes(bytes(raw))


def _escape_index(dst: Path) -> tuple[str, str]:
    index = dst / "model.safetensors.index.json"
    if not index.exists():
        raise ValueError(f"{dst}: escape_index needs a sharded checkpoint (no index found)")
    data = json.loads(index.read_text())
    key = sorted(data["weight_map"])[0]
    data["weight_map"][key] = "../evil.safetensors"
    index.write_text(json.dumps(data, indent=2))
    return index.name, key


def corrupt_copy(src_dir: str | Path, dst_dir: str | Path, mode: str) -> Corrupted:
    """Copy checkpoint `src_dir` to `dst_dir` and break it in one way (see CORRUPT_MODES).

    truncate: cut 100 bytes off the last shard. bad_header: garbage JSON in the first
    shard's header (length kept). escape_index: first weight_map entry -> "../evil.safetensors"
    (the file is not created). nan: element [0, 0] of the first (sorted) matrix of the
    first shard set to NaN. missing_tensor: that matrix dropped from its shard (the index,
    if any, still names it). bin_only: config + tokenizer + a dummy (non-pickle)
    `pytorch_model.bin`, no safetensors.
    """
    if mode not in CORRUPT_MODES:
        raise ValueError(f"mode {mode!r}: expected one of {CORRUPT_MODES}")
    src, dst = Path(src_dir), Path(dst_dir)
    if mode == "bin_only":
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
        (dst / "pytorch_model.bin").write_bytes(b"not a pickle: never unpickle me\n")
        return Corrupted(dst, "pytorch_model.bin")
    shutil.copytree(src, dst)
    files = checkpoint_files(dst)
    if mode == "truncate":
        with open(files[-1], "r+b") as fh:
            fh.truncate(files[-1].stat().st_size - 100)
        return Corrupted(dst, files[-1].name)
    if mode == "bad_header":
        _bad_header(files[0])
        return Corrupted(dst, files[0].name)
    if mode == "escape_index":
        return Corrupted(dst, *_escape_index(dst))
    edit = _set_nan if mode == "nan" else _drop
    return Corrupted(dst, files[0].name, _rewrite(files[0], edit))


# ----------------------------------------------------------------------------- all at once

def build_all(root: str | Path) -> dict[str, object]:
    """Every fixture under `root`: the pairs (ModelPair) and adapters (Path), by name."""
    root = Path(root)
    llama = build_llama_pair(root / "llama")
    qwen = build_qwen_tied_pair(root / "qwen_tied")
    out = {"llama_pair": llama, "qwen_tied_pair": qwen,
           "llama_added_tokens_pair": ModelPair(
               llama.base, build_added_tokens_instruct(llama.base, root / "llama_added" / "instruct")),
           "llama_pair_bf16": build_bf16_pair(llama, root / "llama_bf16")}
    for name, cfg in lora_configs().items():
        base = qwen.base if name.startswith("qwen") else llama.base
        out[f"{name}_adapter"] = build_adapter(base, root / "adapters" / name, cfg)
    return out


if __name__ == "__main__":
    for name, value in build_all(sys.argv[1] if len(sys.argv) > 1 else "tiny_models").items():
        print(f"{name}: {value}")
