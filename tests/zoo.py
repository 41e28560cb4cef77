"""The model zoo: tiny random models of every decoder family we support, built at test time.

`FAMILIES` is data: per family the transformers `model_type` and the config overrides that
make it tiny (hidden 32–64, 2 layers). `build_family` writes a base checkpoint, an
"instruct" checkpoint (the base with every tensor moved by noise: linears, embeddings, heads,
norms, biases) and a PEFT LoRA knowledge adapter on all linear layers (`all-linear`, which
means Conv1D on GPT-2), all with transformers + peft only (no stream_readapt code).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fixtures_models as fm

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_LIKE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


@dataclass(frozen=True)
class Family:
    """A decoder family of the zoo: its transformers model_type and what makes it tiny."""

    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)  # LoraConfig overrides of the knowledge adapter
    image_text: bool = False  # a multimodal wrapper (AutoModelForImageTextToText); _COMMON goes to text_config


FAMILIES = [
    Family("llama", "llama", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    Family("llama-tied", "llama", {**_LLAMA_LIKE, "tie_word_embeddings": True}),
    Family("mistral", "mistral", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    Family("qwen2", "qwen2", {**_LLAMA_LIKE, "tie_word_embeddings": True}),
    Family("qwen3", "qwen3", {**_LLAMA_LIKE, "head_dim": 16, "tie_word_embeddings": False}),
    Family("gemma", "gemma", {**_LLAMA_LIKE, "head_dim": 16}),
    Family("gemma2", "gemma2", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 32}),
    Family("gemma3", "gemma3_text", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 32}),
    Family("phi3", "phi3", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    Family("phi", "phi", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    Family("gpt_neox", "gpt_neox", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    Family("falcon", "falcon", {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "new_decoder_architecture": False, "multi_query": True}),
    Family("gpt2", "gpt2", {"n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    Family("olmo2", "olmo2", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    Family("starcoder2", "starcoder2", {**_LLAMA_LIKE, "tie_word_embeddings": True}),
    Family("cohere", "cohere", {**_LLAMA_LIKE}),
    Family("stablelm", "stablelm", {**_LLAMA_LIKE, "hidden_size": 64, "tie_word_embeddings": False}),  # rotary dim even
    Family("granite", "granite", {**_LLAMA_LIKE, "embedding_multiplier": 3.0, "logits_scaling": 2.0,
                                  "residual_multiplier": 0.5, "attention_multiplier": 0.3}),
    Family("opt", "opt", {"hidden_size": 48, "ffn_dim": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "word_embed_proj_dim": 48}),
    Family("bloom", "bloom", {"hidden_size": 48, "n_layer": 2, "n_head": 4}),
    Family("gptj", "gptj", {"n_embd": 48, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 64}),
    Family("olmo", "olmo", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    Family("nemotron", "nemotron", {**_LLAMA_LIKE, "tie_word_embeddings": False}),
    Family("glm4", "glm4", {**_LLAMA_LIKE, "head_dim": 16}),
    Family("smollm3", "smollm3", {**_LLAMA_LIKE}),
    Family("internlm3", "internlm3", {**_LLAMA_LIKE, "head_dim": 12}),
    # hybrid attention / state-space models: their depthwise nn.Conv1d weights are 3-D, not experts
    Family("lfm2", "lfm2", {**_LLAMA_LIKE, "layer_types": ["conv", "full_attention"]}),
    Family("zamba2", "zamba2", {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "mamba_d_state": 4, "mamba_headdim": 8, "n_mamba_heads": 12,
                                "layers_block_type": ["mamba", "hybrid"]}),
    # configs transformers saves with {"__float__": "Infinity"} (time_step_limit): read as floats
    Family("bamba", "bamba", {**_LLAMA_LIKE, "attn_layer_indices": [1], "mamba_d_state": 4, "mamba_n_heads": 4,
                              "mamba_d_head": 24, "mamba_n_groups": 1, "mamba_expand": 2}),
    # PEFT refuses LoRA on Mamba's out_proj / conv1d in these (its _check_lora_target_modules_mamba)
    Family("falcon_h1", "falcon_h1", {**_LLAMA_LIKE, "mamba_d_ssm": 48, "mamba_n_heads": 4, "mamba_d_head": 12,
                                      "mamba_d_state": 4, "mamba_n_groups": 1, "head_dim": 12},
           lora={"exclude_modules": ["out_proj"]}),
    # on disk `backbone.`, in memory `model.`: a module saved whole is keyed by its in-memory name
    Family("nemotron_h", "nemotron_h", {**_LLAMA_LIKE, "hybrid_override_pattern": "M*", "mamba_num_heads": 4,
                                        "mamba_head_dim": 24, "ssm_state_size": 4, "n_groups": 1, "head_dim": 12},
           lora={"exclude_modules": ["out_proj"]}),
    # image-text-to-text wrappers: the language model people adapt, inside a vision model
    Family("qwen2_5_vl", "qwen2_5_vl", {
        "text_config": {**_LLAMA_LIKE, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 2]}},
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                          "out_hidden_size": 48, "patch_size": 14, "spatial_merge_size": 2,
                          "fullatt_block_indexes": [0]}}, image_text=True),
    Family("mistral3", "mistral3", {
        "text_config": {**_LLAMA_LIKE, "model_type": "mistral", "head_dim": 12, "tie_word_embeddings": False},
        "vision_config": {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 48,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16, "image_size": 56,
                          "patch_size": 14}}, image_text=True),
    Family("gemma3-vlm", "gemma3", {
        "text_config": {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 32},
        "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
        "mm_tokens_per_image": 4}, image_text=True),
]
BY_NAME = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class ZooModels:
    """One family's checkpoints: base Φ, instruct Θ and a LoRA Ψ trained on the base."""

    family: Family
    base: Path
    instruct: Path
    lora: Path


def tiny_config(family: Family):
    from transformers import AutoConfig

    if family.image_text:
        config = dict(family.config)
        config["text_config"] = {**_COMMON, **config.get("text_config", {})}
        return AutoConfig.for_model(family.model_type, **config)
    return AutoConfig.for_model(family.model_type, **{**_COMMON, **family.config})


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    """Θ = Φ + noise on every parameter, proportional to each tensor's RMS (so norms move too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            rms = float(p.float().pow(2).mean().sqrt()) or 1.0
            p.add_(torch.randn(p.shape, generator=gen) * scale * rms)


def _randomize(model, seed: int) -> None:
    """Random init leaves norms at 1 and biases at 0; move them so every role carries signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@fm.single_thread()
def build_family(family: Family, root: str | Path, *, seed: int = 0) -> ZooModels:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    root = Path(root)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if family.image_text else AutoModelForCausalLM
    base = auto.from_config(tiny_config(family)).float().eval()
    _randomize(base, seed)
    base.save_pretrained(root / "base")
    instruct = copy.deepcopy(base)
    _perturb(instruct, seed + 1)
    instruct.save_pretrained(root / "instruct")
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **family.lora})
    lora = get_peft_model(copy.deepcopy(base), config)
    fm._randomize_zero_lora(lora, std=0.05)
    lora.save_pretrained(root / "lora")
    return ZooModels(family, root / "base", root / "instruct", root / "lora")


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


def load(path, dtype=torch.float32):
    return fm.model_class(path).from_pretrained(path, dtype=dtype).eval()
