"""Adapter configs that merge into a wrong model unless refused, and ones worth a warning.

PiSSA, OLoRA and CorDA initialize the LoRA factors from the base weight's principal
directions and *subtract* them from the base; LoftQ quantizes the base. The adapter then
applies to that residual model, not to the base we are given: merged onto the true base it
is 38-55% off in relative weight error. PEFT itself converts such an adapter into a plain
LoRA of the original base (`save_pretrained(..., path_initial_model_for_weight_conversion=)`),
which we then merge exactly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..io.safetensors_reader import CheckpointError

logger = logging.getLogger(__name__)

# init_lora_weights values after which the adapter no longer applies to the original base.
_MOVED_BASE = re.compile(r"^(pissa|olora|corda|loftq)", re.IGNORECASE)


def refuse_unsupported(path: Path, config: dict) -> None:
    """CheckpointError for adapter variants whose merge onto the base would be wrong."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and _MOVED_BASE.match(init):
        raise CheckpointError(
            f"{path}: init_lora_weights = {init!r}: PEFT changed the base this adapter starts from (a residual or "
            "quantized base), so it does not apply to the original base; convert it to a plain LoRA with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) first")
    if config.get("trainable_token_indices"):
        raise CheckpointError(
            f"{path}: trainable_token_indices (PEFT's trainable tokens: embedding rows trained in place) is not "
            "supported; merge it with PEFT's merge_and_unload() and use the result as the base")
    if config.get("loftq_config"):
        raise CheckpointError(f"{path}: loftq_config is set: this adapter belongs to a LoftQ-quantized base, "
                              "not to the original one; convert it to a plain LoRA with PEFT first")


def _repo_name(source: str) -> str:
    """`org/name` -> `name`; a Hub cache path `.../models--org--name/snapshots/<sha>` -> `name`."""
    m = re.search(r"models--[^/]+--([^/]+)/snapshots/", source)
    return (m.group(1) if m else Path(source.rstrip("/")).name).lower()


def warn_on_contradictions(adapter_source: str, config: dict, base_source: str, base_config: dict) -> None:
    """Warnings (not errors: folders get renamed) when the config names another base."""
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named and _repo_name(named) != _repo_name(str(base_source)):
        logger.warning("%s: base_model_name_or_path is %r but the base given is %s: is this adapter for that base?",
                       adapter_source, named, base_source)
    wanted = (config.get("auto_mapping") or {}).get("base_model_class") if isinstance(config.get("auto_mapping"), dict) else None
    have = base_config.get("architectures") or []
    if isinstance(wanted, str) and have and wanted not in have:
        logger.warning("%s: auto_mapping.base_model_class is %r but the base is %s: is this adapter for that base?",
                       adapter_source, wanted, "/".join(map(str, have)))
