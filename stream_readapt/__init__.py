"""stream_readapt: streaming RE-Adapt / LoRE-Adapt for Hugging Face checkpoints.

    from stream_readapt import extract, merge, patch_model, set_scales, evaluate
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (under this package)
_LAZY = {"extract": "engine.extract", "merge": "engine.merge", "patch_model": "live.patch", "set_scales": "live.patch",
         "evaluate": "eval.evaluate"}


def __getattr__(name):
    # Imported when first asked for: the CLI installs its signal handlers before torch loads
    # (a Ctrl-C during that import printed a traceback), and the patcher pulls in the kernels.
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'stream_readapt' has no attribute {name!r}")


__all__ = ["extract", "merge", "patch_model", "set_scales", "evaluate", "__version__"]
