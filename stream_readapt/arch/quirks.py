"""What the transformers classes do not say about a family, as one table keyed by model_type
(the manner of Liger-Kernel's MODEL_TYPE_TO_APPLY_LIGER_FN). A family with a quirk is one entry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Quirks:
    """Per-family facts beyond the layer classes."""

    no_lora_modules: frozenset[str] = frozenset()  # leaf names PEFT refuses as LoRA targets: kept whole


# peft/tuners/tuners_utils.py `_check_lora_target_modules_mamba`: no LoRA on a Mamba mixer's
# out_proj or conv1d in these families (PEFT raises on loading such an adapter).
_MAMBA = Quirks(no_lora_modules=frozenset({"out_proj", "conv1d"}))
MODEL_TYPE_QUIRKS: dict[str, Quirks] = {t: _MAMBA for t in ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h")}


# nn.Linear subclasses whose forward is still F.linear(x, W, b): PEFT's LoRA and the live layers
# wrap them as Linear layers. Any other subclass that overrides forward (Llama-4's and Phi-MoE's
# routers return tuples, DeepSeek-V4's grouped projection reshapes W, Dory's head rescales its
# logits) is not one: a LoRA added to its output would break it or change what it means.
LINEAR_FORWARD_CLASSES = frozenset({"Linear", "FalconLinear"})


def plain_linear(module) -> bool:
    """Whether `module` computes x·Wᵀ + b as nn.Linear does (so a LoRA on its output is Ψ's)."""
    from torch import nn

    if not isinstance(module, nn.Linear):
        return False
    cls = type(module)
    return cls.forward is nn.Linear.forward or cls.__name__ in LINEAR_FORWARD_CLASSES


def quirks_of(model_type: str | None) -> Quirks:
    return MODEL_TYPE_QUIRKS.get(model_type or "", Quirks())
