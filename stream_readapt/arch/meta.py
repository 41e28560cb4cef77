"""The model of a config, built once per run on the meta device (no memory, no weights).

Everything that asks what a checkpoint's tensors *are* (the role table, the key <-> parameter
map of fused experts) reads this one build: transformers is imported and the model class
instantiated at most once per config and process.
"""

from __future__ import annotations

import json
from functools import lru_cache

# config.json entries that say how a checkpoint was saved, not what the model is
_SAVE_ONLY = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")


def config_key(config: dict) -> str:
    """The canonical JSON of a config (the cache key of its build and of its role table)."""
    return json.dumps(config, sort_keys=True, default=str)


def meta_build(config: dict):
    """(model, transformers' conversion mapping) for `config`, built on the meta device.

    Raises ImportError without transformers, and transformers' own error for a config it cannot
    build (an unknown model_type, custom code); callers decide what that means for them.
    """
    return _build(config_key(config))


@lru_cache(maxsize=8)
def _build(config_json: str):
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping

    config = dict(json.loads(config_json))
    # transformers saves Infinity / NaN as {"__float__": "Infinity"} and decodes them when it loads a
    # config file itself; a config handed over as a dict must be decoded the same way, by its own code.
    base_config = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig  # 5.x / 4.x
    decode = getattr(base_config, "_decode_special_floats", None)
    if decode is not None:
        config = decode(config)
    model_type = config.pop("model_type")
    model_class = _saved_class(transformers, config.get("architectures"))
    for k in _SAVE_ONLY:
        config.pop(k, None)
    cfg = AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        if model_class is not None:  # the class the checkpoint was saved from (a multimodal wrapper too)
            model = model_class._from_config(cfg)
        else:
            model = _auto_model(transformers, AutoModelForCausalLM, cfg)
    return model, get_model_conversion_mapping(model, add_legacy=True)


def _saved_class(transformers, architectures):
    """config.json's `architectures[0]`, when transformers has that model class (else None)."""
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def _auto_model(transformers, causal_lm, cfg):
    """A causal LM, else an image-text-to-text model (Qwen2.5-VL, Mistral-3: the language model
    people adapt lives inside them)."""
    try:
        return causal_lm.from_config(cfg)
    except ValueError:
        return transformers.AutoModelForImageTextToText.from_config(cfg)
