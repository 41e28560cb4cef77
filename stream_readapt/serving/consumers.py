"""Who serves an adapter: one declared record of capabilities per consumer (no torch import,
so the CLI can offer the names). The rewrite is `profiles.apply_profile`, the check `check.py`."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT = "peft"  # the full-fidelity adapter, as PEFT loads it
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks


@dataclass(frozen=True)
class ServingProfile:
    """What one consumer of a LoRA adapter carries."""

    name: str
    full_tensors: bool  # modules_to_save (norms, full embeddings, tensors with added rows)
    biases: bool  # bias="all" entries
    embedding_lora: bool  # lora_embedding_A/B on the input embedding
    head_lora: bool  # lora_A/B on the output head (rows = vocabulary)
    uniform_rank: bool  # one r for every module (zero-padded)
    added_tokens: bool  # can serve a vocabulary larger than the base's
    max_rank: int | None = None
    param_targets: bool = False  # PEFT target_parameters LoRAs (fused experts, routers)

    @property
    def rewrites(self) -> bool:
        """Whether the full-fidelity PEFT adapter is rewritten for this consumer."""
        return self.name != DEFAULT


PROFILES = {
    p.name: p
    for p in (
        ServingProfile(DEFAULT, True, True, True, True, False, True, param_targets=True),
        # vllm/lora/peft_helper.py (validate_legal), lora_model.py (embedding LoRA must match the base vocabulary)
        ServingProfile("vllm", False, False, True, True, False, False, max_rank=VLLM_MAX_LORA_RANKS[-1]),
        # SGLang reads one `r`/`lora_alpha` (buffers sized by it); embedding / head LoRA not relied on
        ServingProfile("sglang", False, False, False, False, True, False),
        # convert_lora_to_gguf.py exits on full tensors; keeps lora_embedding_* (transposes A for token_embd)
        ServingProfile("llama.cpp", False, False, True, True, False, False),
        ServingProfile("portable", False, False, False, False, True, False, max_rank=VLLM_MAX_LORA_RANKS[-1]),
    )
}


def get_profile(name: str) -> ServingProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown serving profile {name!r}: choose one of {', '.join(PROFILES)}")
    return PROFILES[name]
