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


def quirks_of(model_type: str | None) -> Quirks:
    return MODEL_TYPE_QUIRKS.get(model_type or "", Quirks())
