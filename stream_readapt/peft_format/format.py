"""The PEFT LoRA adapter format, in one place: key names, pattern matching, scaling.

Saved tensor names (PEFT 0.13 - 0.21) are the in-memory parameter names of the wrapped model
behind `base_model.model.`: `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r],
`<module>.lora_embedding_A` [r, vocab], `<module>.lora_embedding_B` [dim, r].
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
LINEAR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")  # (A, B) of a Linear / Conv1D / ParamWrapper
EMBEDDING_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")  # (A, B) of an nn.Embedding


def factor_keys(module: str, *, embedding: bool = False) -> tuple[str, str]:
    """The saved names of a module's (A, B) LoRA factors."""
    a, b = EMBEDDING_SUFFIXES if embedding else LINEAR_SUFFIXES
    return PREFIX + module + a, PREFIX + module + b


@dataclass(frozen=True)
class FactorKey:
    """What a saved LoRA factor name says: its module, whether it is an embedding's, A or B."""

    module: str
    embedding: bool
    part: str  # "A" or "B"


def factor_of(key: str) -> FactorKey | None:
    """The inverse of `factor_keys` (the prefix optional); None for any other tensor name."""
    for embedding, suffixes in ((False, LINEAR_SUFFIXES), (True, EMBEDDING_SUFFIXES)):
        for part, suffix in zip("AB", suffixes):
            if key.endswith(suffix):
                return FactorKey(key.removeprefix(PREFIX)[: -len(suffix)], embedding, part)
    return None


def pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's `get_pattern_key`: first key whose regex matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def lora_scaling(alpha: float, r: int, *, rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / √r for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def config_scaling(config: dict, module: str) -> float:
    """The scaling of `module` under an adapter_config.json (rank_pattern / alpha_pattern by
    PEFT's key matching, else r / lora_alpha; rsLoRA honoured)."""
    r_key = pattern_key(config.get("rank_pattern") or {}, module)
    a_key = pattern_key(config.get("alpha_pattern") or {}, module)
    r = config["rank_pattern"][r_key] if r_key else config["r"]
    alpha = config["alpha_pattern"][a_key] if a_key else config["lora_alpha"]
    return lora_scaling(alpha, r, rslora=bool(config.get("use_rslora")))


def write_adapter_config(folder: Path, config: dict) -> None:
    """adapter_config.json as PEFT writes it (indented, one trailing newline)."""
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def outermost_modules(modules: list[str] | None) -> list[str] | None:
    """modules_to_save without the modules inside another one: PEFT saves a module with all its
    children, and cannot wrap a child of a module it already wraps (Gemma-3's projector and its
    norm, SigLIP's pooling head and its attention)."""
    if not modules:
        return modules
    kept = sorted(set(modules))
    return [m for m in kept if not any(m.startswith(other + ".") for other in kept)]
