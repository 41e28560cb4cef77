"""Optional dependencies: which extra brings each, and the one-line error when one is missing.

The core install (torch, safetensors, huggingface-hub) runs `demo`, `extract` and `merge` on
checkpoints whose tensor names say what they are. Everything else is an extra, imported only
where it is used; a missing one is a `MissingExtra` (an ImportError) naming the command that
installs it, which the CLI prints as one line.

Example:
    >>> rouge = require("rouge_score", "ROUGE-L scoring", extra="eval-qa")
"""

from __future__ import annotations

import importlib

# importable top-level module -> (distribution on PyPI, the extra that brings it)
EXTRAS: dict[str, tuple[str, str]] = {
    "transformers": ("transformers", "hf"),
    "peft": ("peft", "hf"),
    "matplotlib": ("matplotlib", "plot"),
    "rouge_score": ("rouge-score", "eval-qa"),
    "bm25s": ("bm25s", "eval-qa"),
    "lm_eval": ("lm-eval", "eval"),
    "triton": ("triton", "kernels"),
}


class MissingExtra(ImportError):
    """An optional dependency a command needs is not installed (the message says how to get it)."""


def install_hint(module: str, extra: str | None = None) -> str:
    """"pip install 'stream-readapt[hf]'" for module 'transformers'."""
    root = module.split(".")[0]
    extra = extra or EXTRAS[root][1]
    return f"pip install 'stream-readapt[{extra}]'"


def missing(module: str, what: str, extra: str | None = None) -> MissingExtra:
    """The error for `what` needing `module`, which is not installed."""
    root = module.split(".")[0]
    dist = EXTRAS[root][0] if root in EXTRAS else root
    return MissingExtra(f"{what} needs {dist}, which is not installed: {install_hint(root, extra)}")


def require(module: str, what: str, *, extra: str | None = None):
    """`importlib.import_module(module)`, or a MissingExtra saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not _is_missing(e, module):
            raise  # the package is there but broken: not a missing extra
        raise missing(module, what, extra) from None


def available(module: str) -> bool:
    """Whether `module` imports (a cheap check for optional behaviour, e.g. a warning)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def extra_for_error(error: BaseException) -> str | None:
    """The one-line message for a ModuleNotFoundError of an optional package raised anywhere
    below a command (None for anything else: that one is a bug of ours)."""
    if isinstance(error, MissingExtra):
        return str(error)
    name = getattr(error, "name", None) or ""
    if not isinstance(error, ModuleNotFoundError) or name.split(".")[0] not in EXTRAS:
        return None
    return str(missing(name, "this command"))


def _is_missing(error: ModuleNotFoundError, module: str) -> bool:
    name = error.name or ""
    return name.split(".")[0] == module.split(".")[0]
