"""Turn a local path or a Hugging Face Hub id into a local folder.

Hub downloads go through `huggingface_hub.snapshot_download`, so the user's cache,
tokens, `revision` and `HF_HUB_OFFLINE` behave as everywhere else; we fetch only
safetensors, JSON and tokenizer files, never pickles.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/")) and ".." not in text


def resolve_model_dir(path_or_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder holding the checkpoint `path_or_id` (downloaded if it is a Hub id).

    Raises FileNotFoundError when it is neither an existing folder nor a plausible Hub id.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: expected a checkpoint folder, got a file")
        return path
    text = str(path_or_id)
    if not looks_like_hub_id(text):
        raise FileNotFoundError(f"{text}: no such folder (and not a Hugging Face Hub id)")
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("resolving %s@%s from the Hugging Face Hub", repo_id, revision or "main")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id}: not a local folder, and not in the Hub cache (offline or unreachable)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise FileNotFoundError(f"{repo_id}: could not fetch from the Hugging Face Hub ({e})") from None
