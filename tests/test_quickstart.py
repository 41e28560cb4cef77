"""The README's quick start is what CI runs, and every optional extra fails in one line.

A newcomer's first command runs with the core install alone; CI runs it in a fresh virtual
environment of its own (`.ci/run`). The matrix below runs each command with each optional
package made unimportable (`extras_driver.py`, one child process per package) and checks that
the command either works or says, in one line, which extra to install.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stream_readapt import extract
from stream_readapt.optional import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def readme_quick_start() -> list[str]:
    """The command lines of the README's quick-start code block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def ci_quick_start() -> list[str]:
    """The lines `.ci/run` runs under its `# README quick start, ... command` markers."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith("# README quick start")]


def test_ci_runs_both_quick_start_commands_as_the_readme_writes_them():
    readme = readme_quick_start()
    assert len(readme) == 2 and "stream-readapt demo" in readme[0] and "pytest" in readme[1]
    assert ci_quick_start() == readme


def test_ci_runs_the_first_command_in_a_fresh_environment_of_its_own():
    script = (ROOT / ".ci" / "run").read_text()
    first, second = ci_quick_start()
    before_first = script[: script.index(first)]
    venvs = re.findall(r"python3 -m venv (\S+)", script)
    assert len(set(venvs)) == 2, "one fresh virtual environment per command"
    assert f". {venvs[0]}/bin/activate" in before_first and f"{venvs[1]}/bin/activate" not in before_first
    assert "-c .ci/constraints.txt" not in first  # nothing but what it installs itself


# ----------------------------------------------------------------------------- optional extras

# (package made unimportable, command) -> the extra its one-line error names; any pair not
# listed must succeed (rc 0), except where FAILS_ANYWAY says how it fails with everything there.
NEEDS = {
    ("transformers", "eval"): "eval-qa",
    ("transformers", "eval-tasks"): "eval-qa",
    ("transformers", "lore-moe"): "hf",
    ("matplotlib", "plot"): "plot",
    ("matplotlib", "eval"): "eval-qa",
    ("matplotlib", "eval-tasks"): "eval-qa",
    ("rouge_score", "eval"): "eval-qa",
    ("rouge_score", "eval-tasks"): "eval-qa",
    ("bm25s", "eval"): "eval-qa",
    ("bm25s", "eval-tasks"): "eval-qa",
    ("lm_eval", "eval-tasks"): "eval",
}
FAILS_ANYWAY = {"eval-tasks": "unknown lm-eval task"}  # a made-up task: lm-eval itself says no
COMMANDS = ("demo", "extract", "lore", "lore-moe", "merge", "inspect", "plot", "check", "eval", "eval-tasks")


@pytest.fixture(scope="module")
def inputs(llama_pair, lora_adapter, tmp_path_factory):
    from fixtures_moe import build_moe_pair

    root = tmp_path_factory.mktemp("extras_inputs")
    lore = root / "lore"
    extract(llama_pair.base, llama_pair.instruct, lore, energy=0.5, device="cpu")
    words = [f"w{i}" for i in range(10, 100, 7)]
    (root / "qa.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "question": f"{words[i]} {words[i + 1]}",
                                                       "answers": [words[i + 2]], "passage_id": f"p{i}"}) + "\n"
                                           for i in range(3)))
    (root / "p.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": " ".join(words[i:i + 4])}) + "\n"
                                          for i in range(3)))
    return {"pair": llama_pair, "lora": lora_adapter, "lore": lore, "root": root,
            "moe": build_moe_pair("mixtral", root / "mixtral")}


def _commands(inputs, out: Path) -> dict[str, list[str]]:
    base, instruct = str(inputs["pair"].base), str(inputs["pair"].instruct)
    lore, root, cpu = str(inputs["lore"]), inputs["root"], ["--device", "cpu", "--quiet"]
    evaluate = ["eval", base, "--data", str(root / "qa.jsonl"), "-o", str(out / "eval"), "--knowledge",
                str(inputs["lora"]), "--alpha", "0,1", "--passages", str(root / "p.jsonl"), "--retrieval", "bm25",
                "--max-new-tokens", "2", *cpu]
    return {
        "demo": ["demo", "--dir", str(out / "demo"), "--quiet"],
        "extract": ["extract", base, instruct, "-o", str(out / "full"), *cpu],
        "lore": ["extract", base, instruct, "-o", str(out / "lore"), "--energy", "0.5", *cpu],
        "lore-moe": ["extract", str(inputs["moe"].base), str(inputs["moe"].instruct), "-o", str(out / "moe"),
                     "--energy", "0.5", *cpu],
        "merge": ["merge", base, "-o", str(out / "merged"), "--instruct", instruct, "--knowledge", str(inputs["lora"]),
                  *cpu],
        "inspect": ["inspect", lore],
        "plot": ["inspect", lore, "--plot", str(out / "spectra.png")],
        "check": ["inspect", lore, "--check", "vllm"],
        "eval": evaluate,
        "eval-tasks": [*evaluate[:5], str(out / "eval-tasks"), *evaluate[6:], "--tasks", "no_such_task_xyz"],
    }


@pytest.fixture(scope="module", params=sorted(EXTRAS))
def blocked_run(request, inputs, tmp_path_factory):
    """Every command, in one child process where `request.param` cannot be imported."""
    out = tmp_path_factory.mktemp(f"without_{request.param}")
    (out / "commands.json").write_text(json.dumps(_commands(inputs, out)))
    subprocess.run([sys.executable, str(HERE / "extras_driver.py"), request.param, str(out / "commands.json"),
                    str(out / "results.json")], check=True, timeout=900)
    return request.param, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_extra_is_one_line_naming_it(blocked_run, command):
    package, results = blocked_run
    rc, stderr = results[command]["rc"], results[command]["stderr"]
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr
    extra = NEEDS.get((package, command))
    if extra is None and command not in FAILS_ANYWAY:
        assert rc == 0, f"{command} without {package}: {stderr}"
        return
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert rc == 1 and len(errors) == 1, stderr
    if extra is None:
        assert FAILS_ANYWAY[command] in errors[0]
    else:
        assert f"pip install 'stream-readapt[{extra}]'" in errors[0] and EXTRAS[package][0] in errors[0]


def test_every_extra_named_in_a_message_exists():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {extra for _, extra in EXTRAS.values()} | set(NEEDS.values()) <= set(extras)
    for package, (dist, extra) in EXTRAS.items():  # the extra really brings the package (directly or nested)
        def brings(name, seen=()):
            reqs = extras[name]
            return any(r.startswith(dist) for r in reqs) or any(
                inner not in seen and brings(inner, seen + (name,))
                for r in reqs if r.startswith("stream-readapt[") for inner in r[15:].split("]")[0].split(","))
        assert brings(extra), f"{extra} does not install {dist}"
