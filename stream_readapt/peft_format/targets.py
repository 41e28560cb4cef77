"""Which modules a PEFT LoRA adapter adapts, decided from its config exactly as PEFT's loader does.

PEFT wraps a module only if `target_modules` selects it, `exclude_modules` and `modules_to_save`
do not, and its layer is in `layers_to_transform`; tensors in the adapter file for any other
module are unexpected keys that PEFT ignores when it loads the adapter. So do we: a LoRA whose
config targets only `q_proj` but ships `v_proj` tensors too adapts `q_proj` alone.
Mirrors `peft.tuners.tuners_utils.check_target_module_exists` (PEFT 0.21).
"""

from __future__ import annotations

import re

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear / Conv1D layer but the output head


def _names_match(patterns, module: str) -> bool:
    """A regex matched over the whole name (a string), or a name list matched by equality or suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return module in patterns or any(module.endswith(f".{p}") for p in patterns)


def _layer_index(module: str, layers_pattern) -> int | None:
    """The first numbered path segment (or the one after `layers_pattern`): the layer index."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    return int(match["idx"]) if match else None


def _in_layers(config: dict, module: str) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def adapts_module(config: dict, module: str, *, embedding: bool = False) -> bool:
    """Whether PEFT would wrap `module` (an in-memory module name) with this adapter's LoRA.

    `embedding`: the module is an nn.Embedding (`lora_embedding_A/B`), which "all-linear" leaves out.
    """
    exclude = config.get("exclude_modules")
    if exclude and _names_match(exclude, module):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if targets is None:  # target_parameters alone: no module is wrapped (none given: keep every one)
        return not config.get("target_parameters")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return not embedding
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:  # named in full: layers_to_transform does not apply (PEFT's order)
        return True
    return any(module.endswith(f".{t}") for t in targets) and _in_layers(config, module)
