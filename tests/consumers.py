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


LLAMA_CPP_PYTHON = "0.3.36"  # also pinned in .ci/constraints.txt


def llama_cpp_sources() -> Path:
    """llama.cpp's Python converters and gguf-py, as vendored in the llama-cpp-python sdist."""
    import tarfile

    cache = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    root = cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (root / "convert_lora_to_gguf.py").is_file():
        return root
    sdist = _download(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", cache, "--no-binary", ":all:")
    wanted = ("/vendor/llama.cpp/gguf-py/", "/vendor/llama.cpp/conversion/", "/vendor/llama.cpp/convert_")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if any(w in m.name for w in wanted) and m.isfile()]
        tar.extractall(cache / "src", members=members, filter="data")
    return root


def convert_lora_to_gguf(adapter: Path, base: Path, out: Path) -> subprocess.CompletedProcess:
    """Run llama.cpp's own convert_lora_to_gguf.py on `adapter` (base config from `base`)."""
    root = llama_cpp_sources()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)])}
    cmd = [sys.executable, str(root / "convert_lora_to_gguf.py"), "--base", str(base), "--outfile", str(out), str(adapter)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def gguf_module():
    root = llama_cpp_sources()
    if str(root / "gguf-py") not in sys.path:
        sys.path.insert(0, str(root / "gguf-py"))
    import gguf

    return gguf


SGLANG = "0.5.23"  # also pinned in .ci/constraints.txt


def sglang_lora() -> types.SimpleNamespace:
    """SGLang's LoRAConfig (sglang/srt/lora/lora_config.py: needs only huggingface_hub) and the
    source of lora.py / mem_pool.py, whose scaling and buffer-shape rules the tests apply."""
    wheel = _download(f"sglang=={SGLANG}", CACHE / f"sglang-{SGLANG}")
    with zipfile.ZipFile(wheel) as z:
        tree = ast.parse(z.read("sglang/srt/lora/lora_config.py").decode())
        sources = {m: z.read(f"sglang/srt/lora/{m}.py").decode() for m in ("lora", "mem_pool")}
    ns = _exec(tree, lambda n: True, "_sglang_lora_config")
    return types.SimpleNamespace(LoRAConfig=ns["LoRAConfig"], sources=sources)


LLAMA_CPP_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
)


def _llama_cpp_full_sources() -> Path:
    """The whole sdist (llama.cpp's C++ sources and llama-cpp-python's `llama_cpp` package)."""
    import tarfile

    llama_cpp_sources()  # downloads the sdist if needed
    cache = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    src = cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    stamp = src / ".complete"
    if not stamp.is_file():
        with tarfile.open(next(p for p in cache.iterdir() if p.name.endswith(".tar.gz"))) as tar:
            tar.extractall(cache / "src", filter="data")
        stamp.write_text("")
    return src


def llama_cpp_runtime():
    """llama-cpp-python's ctypes bindings (`llama_cpp.llama_cpp`) over libllama built from the sdist.

    Only the `llama` library target of the vendored llama.cpp is built (cmake, Release, shared,
    GGML_NATIVE=OFF, no tools/examples/tests/common), once per machine, into the test cache;
    a plain `pip install` of the sdist would also build mtmd and the common library. The package
    is imported from the sdist without running its `__init__` (whose high-level `Llama` class
    needs diskcache and jinja2); the low-level bindings need only typing_extensions.
    Skips when cmake or a C++ compiler is missing.
    """
    import importlib
    import shutil
    import time

    if "llama_cpp.llama_cpp" in sys.modules:
        return sys.modules["llama_cpp.llama_cpp"]
    missing = [t for t in ("cmake",) if shutil.which(t) is None]
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (c++/g++/clang++)")
    if missing:
        pytest.skip(f"building llama.cpp needs {' and '.join(missing)}")
    src = _llama_cpp_full_sources()
    build = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "build"
    lib = build / "bin"
    if not (lib / "libllama.so").is_file() or not (build / ".complete").is_file():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        jobs = str(os.cpu_count() or 2)
        log = build.parent / "build.log"
        start = time.monotonic()
        with open(log, "w") as fh:
            for cmd in (["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *generator,
                         *LLAMA_CPP_CMAKE_ARGS],
                        ["cmake", "--build", str(build), "--target", "llama", "-j", jobs]):
                if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode != 0:
                    pytest.fail(f"building llama.cpp failed ({' '.join(cmd[:3])} ...): "
                                f"{log.read_text()[-3000:]}")
        (build / ".complete").write_text(f"{time.monotonic() - start:.0f} s\n")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
    package = types.ModuleType("llama_cpp")  # a namespace for the bindings, __init__ not run
    package.__path__ = [str(src / "llama_cpp")]
    sys.modules["llama_cpp"] = package
    return importlib.import_module("llama_cpp.llama_cpp")


def convert_hf_to_gguf(model: Path, out: Path, outtype: str = "f32") -> subprocess.CompletedProcess:
    """Run llama.cpp's own convert_hf_to_gguf.py on a Hugging Face checkpoint folder."""
    root = llama_cpp_sources()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)])}
    cmd = [sys.executable, str(root / "convert_hf_to_gguf.py"), "--outtype", outtype, "--outfile", str(out), str(model)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
