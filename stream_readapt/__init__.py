"""stream_readapt: streaming RE-Adapt / LoRE-Adapt for Hugging Face checkpoints.

    from stream_readapt import extract, merge, patch_model, set_scales, evaluate
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {"extract": "extract", "merge": "merge", "patch_model": "patch", "set_scales": "patch", "evaluate": "evaluate"}


class _Package(types.ModuleType):
    """`stream_readapt.merge` / `.extract` / `.evaluate` stay the functions once their modules are
    imported (the import system would set the attribute to the submodule)."""

    def __setattr__(self, name, value):
        if _LAZY.get(name) == name and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    # Imported when first asked for: the CLI installs its signal handlers before torch loads
    # (a Ctrl-C during that import printed a traceback), and the patcher pulls in the kernels.
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'stream_readapt' has no attribute {name!r}")


__all__ = ["extract", "merge", "patch_model", "set_scales", "evaluate", "__version__"]
