"""The serving consumers' own code, fetched from PyPI at test time and cached between runs.

vLLM: `pip download --no-deps vllm==VLLM` (the wheel, never installed: its import chain
needs a GPU stack); the LoRA config and weight-name code (vllm/lora/peft_helper.py,
vllm/lora/utils.py) is read from the wheel and executed verbatim, with only its
`from vllm...` imports replaced by the two names they provide (a logger, LoRAConfig's type).
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

VLLM = "0.33.0"  # also pinned in .ci/constraints.txt
CACHE = Path(os.environ.get("STREAM_READAPT_TEST_CACHE", Path.home() / ".cache" / "stream_readapt_tests"))


def _download(spec: str, dest: Path, *extra: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz")]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra, spec, "-d", str(dest)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot download {spec} from the package index: {done.stderr.strip().splitlines()[-1:]}")
        found = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz")]
    return found[0]


def _vllm_source(wheel: Path, member: str) -> ast.Module:
    with zipfile.ZipFile(wheel) as z:
        return ast.parse(z.read(member).decode(), filename=member)


def _exec(tree: ast.Module, keep, name: str, **names) -> dict:
    """Run the module's top-level statements that `keep` accepts, minus `from vllm...` imports,
    as a registered module (dataclasses look their module up in sys.modules)."""
    body = [n for n in tree.body if keep(n) and not (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("vllm"))]
    module = types.ModuleType(name)
    module.__dict__.update(names)
    sys.modules[name] = module
    exec(compile(ast.Module(body=body, type_ignores=[]), f"<{name} from vllm {VLLM}>", "exec"), module.__dict__)
    return module.__dict__


def vllm_lora() -> types.SimpleNamespace:
    """vLLM's PEFTHelper, parse_fine_tuned_lora_name and is_base_embedding_weights."""
    wheel = _download(f"vllm=={VLLM}", CACHE / f"vllm-{VLLM}")
    ns = _exec(_vllm_source(wheel, "vllm/lora/peft_helper.py"), lambda n: True, "_vllm_peft_helper",
               init_logger=logging.getLogger, LoRAConfig=object)
    wanted = {"parse_fine_tuned_lora_name", "is_base_embedding_weights"}
    utils = _exec(_vllm_source(wheel, "vllm/lora/utils.py"),
                  lambda n: isinstance(n, ast.FunctionDef) and n.name in wanted, "_vllm_lora_utils")
    return types.SimpleNamespace(PEFTHelper=ns["PEFTHelper"], **{k: utils[k] for k in wanted})
