"""Tiny mixture-of-experts checkpoints (Mixtral, Qwen3-MoE, DeepSeek-V3 with MLA, gpt-oss),
built with transformers + peft at test time, like `fixtures_models.py`.

transformers 5 saves Mixtral / Qwen3-MoE / DeepSeek-V3 with one tensor per expert on disk
(`model.layers.0.block_sparse_moe.experts.3.w1.weight` [I, H],
`model.layers.0.mlp.experts.3.gate_proj.weight`) and fuses them at load
(`model.layers.0.mlp.experts.gate_up_proj` [E, 2I, H], `...experts.down_proj` [E, H, I]).
gpt-oss stores the fused, transposed layout on disk as in memory
(`mlp.experts.gate_up_proj` [E, H, 2I] plus `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H]).

Knowledge adapters use PEFT `target_parameters` on the fused experts (ParamWrapper):
`base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight` [r·E, in] and
`...lora_B.weight` [out, r·E] for the first parameter of the module (gate_up_proj), the same
without `base_layer.` for the second (down_proj).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fixtures_models import ModelPair, VOCAB, build_tokenizer, single_thread, train_steps

MOE_ARCHS = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
EXPERTS = 4
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)


def moe_config(arch: str):
    """A tiny config: hidden 64, 4 experts of intermediate 40, 2 per token, 2 layers."""
    from transformers import DeepseekV3Config, GptOssConfig, MixtralConfig, Qwen3MoeConfig

    if arch == "mixtral":
        return MixtralConfig(intermediate_size=40, num_local_experts=EXPERTS, num_experts_per_tok=2, **_COMMON)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(moe_intermediate_size=40, intermediate_size=88, num_experts=EXPERTS,
                              num_experts_per_tok=2, head_dim=16, **_COMMON)
    if arch == "deepseek_v3":  # layer 0 dense, layer 1 MoE with a shared expert; MLA attention
        return DeepseekV3Config(moe_intermediate_size=40, intermediate_size=88, n_routed_experts=EXPERTS,
                                num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                v_head_dim=16, n_group=1, topk_group=1, **_COMMON)
    if arch == "gpt_oss":
        return GptOssConfig(intermediate_size=40, num_local_experts=EXPERTS, num_experts_per_tok=2,
                            head_dim=16, sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                            **_COMMON)
    raise ValueError(arch)


@single_thread()
def build_moe_pair(arch: str, root: str | Path, *, seed: int = 0) -> ModelPair:
    """Base (random init) and instruct (a few AdamW steps on it) of a tiny MoE model."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(moe_config(arch)).eval()
    base.save_pretrained(root / "base")
    build_tokenizer().save_pretrained(root / "base")
    instruct = train_steps(copy.deepcopy(base), seed=seed + 1)
    instruct.save_pretrained(root / "instruct")
    build_tokenizer().save_pretrained(root / "instruct")
    return ModelPair(root / "base", root / "instruct")


def moe_lora_config(arch: str):
    """LoRA on attention projections plus `target_parameters` on both fused expert tensors."""
    from peft import LoraConfig

    attention = ["q_a_proj", "kv_b_proj", "o_proj"] if arch == "deepseek_v3" else ["q_proj", "v_proj", "o_proj"]
    return LoraConfig(r=4, lora_alpha=8, target_modules=attention,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                      rank_pattern={"layers.1.mlp.experts.down_proj": 3}, alpha_pattern={"o_proj": 5})


@single_thread()
def build_moe_adapter(base_dir: str | Path, out: str | Path, config, *, seed: int = 3) -> Path:
    """A PEFT adapter on `base_dir` with every factor random (non-zero B), saved to `out`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), copy.deepcopy(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return Path(out)
