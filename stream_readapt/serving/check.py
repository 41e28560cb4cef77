"""`inspect --check CONSUMER`: would an adapter (from any tool) load there and be applied as PEFT applies it?

Each rule cites the consumer code it mirrors; the tests run the consumers' own code on the
same adapters, so a rule that drifts from its consumer fails there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..io.safetensors_reader import SafetensorsFile
from ..peft_format.format import ADAPTER_FILE, config_scaling, factor_of
from .consumers import VLLM_MAX_LORA_RANKS

CONSUMERS = ("vllm", "sglang", "llama.cpp")
_NORM_HINTS = ("norm",)  # convert_lora_to_gguf.py keeps `_layernorm` / `.norm` tensors, exits on any other


def _ranks(folder: Path) -> tuple[dict[str, int], list[str]]:
    """Each low-rank module's rank (rows of its A) and the keys of every other tensor."""
    ranks, others = {}, []
    with SafetensorsFile(folder / ADAPTER_FILE) as f:
        for key in sorted(f.tensors):
            factor = factor_of(key)
            if factor is None:
                others.append(key)
            elif factor.part == "A":
                ranks[factor.module] = f.info(key).shape[0]
    return ranks, others


def _common(config: dict) -> list[str]:
    reasons = []
    if config.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type {config.get('peft_type')!r}: only LoRA adapters are served")
    if config.get("use_dora"):
        reasons.append("use_dora: DoRA is not supported")
    if config.get("lora_bias"):
        reasons.append("lora_bias: LoRA biases are not supported")
    if config.get("bias", "none") != "none":
        reasons.append(f"bias={config['bias']!r}: bias tensors are not loaded")
    return reasons


def check_vllm(config: dict, ranks: dict, others: list[str]) -> list[str]:
    """vllm/lora/peft_helper.py validate_legal, utils.py parse_fine_tuned_lora_name (vLLM 0.33)."""
    reasons = _common(config)
    mts = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if mts:
        reasons.append(f"modules_to_save {mts}: vLLM refuses full modules for language models")
    bad = [k for k in others if not k.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))]
    if bad and not mts:
        reasons.append(f"tensor {bad[0]} (and {len(bad) - 1} more): not lora_A/B.weight or lora_embedding_A/B")
    top = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values(), *ranks.values()])
    if top > VLLM_MAX_LORA_RANKS[-1]:
        reasons.append(f"rank {top} > {VLLM_MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM accepts")
    if isinstance(config.get("init_lora_weights"), str) and config["init_lora_weights"].lower() not in (
            "gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        reasons.append(f"init_lora_weights={config['init_lora_weights']!r} changes the base weights")
    return reasons


def check_sglang(config: dict, ranks: dict, others: list[str]) -> list[str]:
    """SGLang sizes its LoRA buffers from one `r` and scales by one lora_alpha / r."""
    reasons = _common(config)
    if config.get("modules_to_save"):
        reasons.append(f"modules_to_save {config['modules_to_save']}: full modules are not loaded")
    other_ranks = sorted({r for r in ranks.values() if r != config.get("r")})
    if other_ranks or config.get("rank_pattern"):
        reasons.append(f"per-module ranks {other_ranks or list(config['rank_pattern'].values())[:4]} != r={config.get('r')}: "
                       "SGLang uses one rank per adapter (pad to one rank: --profile sglang)")
    if config.get("alpha_pattern"):
        reasons.append("alpha_pattern: SGLang scales every module by lora_alpha / r")
    return reasons


def check_llama_cpp(config: dict, ranks: dict, others: list[str]) -> list[str]:
    """convert_lora_to_gguf.py and llama-adapter.cpp (scale = lora_alpha / rank of each tensor)."""
    reasons = _common(config)
    full = [k for k in others if ".base_layer." not in k and not k.endswith(".bias")]
    fatal = [k for k in full if not any(h in k for h in _NORM_HINTS)]
    if fatal:
        reasons.append(f"full tensor {fatal[0]} (and {len(fatal) - 1} more): convert_lora_to_gguf.py stops on it")
    elif full:
        reasons.append(f"norm tensor {full[0]} (and {len(full) - 1} more): the converter keeps it, llama.cpp ignores it at run time")
    alpha = config.get("lora_alpha", 8)
    off = {m: (alpha / r) / config_scaling(config, m) for m, r in ranks.items()}
    off = {m: x for m, x in off.items() if not math.isclose(x, 1.0, rel_tol=1e-6)}
    if off:
        worst = max(off, key=lambda m: abs(math.log(off[m])))
        reasons.append(f"{len(off)} modules scaled unlike PEFT (llama.cpp: lora_alpha / tensor rank), "
                       f"up to {off[worst]:.3g}x in {worst}: use --profile llama.cpp")
    return reasons


def check_adapter(folder, consumer: str) -> list[str]:
    """Reasons `consumer` would not load `folder` or not apply it as PEFT does (empty: fine)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks, others = _ranks(folder)
    rules = {"vllm": check_vllm, "sglang": check_sglang, "llama.cpp": check_llama_cpp}
    if consumer not in rules:
        raise ValueError(f"unknown consumer {consumer!r}: choose one of {', '.join(CONSUMERS)}")
    return rules[consumer](config, ranks, others)


def check_report(paths, consumer: str) -> str:
    lines = []
    for path in paths:
        reasons = check_adapter(path, consumer)
        lines.append(f"{path}: {'loads in ' + consumer if not reasons else 'would NOT load as PEFT applies it in ' + consumer}")
        lines += [f"  - {r}" for r in reasons]
    return "\n".join(lines)
