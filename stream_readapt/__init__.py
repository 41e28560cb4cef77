"""stream_readapt: streaming RE-Adapt / LoRE-Adapt for Hugging Face checkpoints.

    from stream_readapt import extract, merge, patch_model, set_scales, evaluate
"""

__version__ = "0.1.0"

from .extract import extract  # noqa: E402
from .merge import merge  # noqa: E402
from .evaluate import evaluate  # noqa: E402  (transformers is imported only when it runs)


def __getattr__(name):
    # The patcher pulls in the kernels; import it only when asked for.
    if name in ("patch_model", "set_scales"):
        from . import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'stream_readapt' has no attribute {name!r}")


__all__ = ["extract", "merge", "patch_model", "set_scales", "evaluate", "__version__"]
