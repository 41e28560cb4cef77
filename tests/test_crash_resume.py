"""Runs killed at random points (kill -9, SIGTERM, SIGHUP, SIGINT), resumed, and run twice at once.

Each run is a real `stream-readapt` child process on a 10-shard pair (tests/sharded_pair.py);
what it leaves is compared byte for byte with an uninterrupted run made in this process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharded_pair import build_sharded_pair, output_bytes
from stream_readapt import extract, merge
from stream_readapt.io.ownership import JOURNAL_FILE, OWNER_FILE

SEED = int(os.environ.get("STREAM_READAPT_TEST_SEED", "0")) or random.randrange(1, 10**6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_sharded_pair(tmp_path_factory.mktemp("sharded"), layers=10, size=1200)


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    merge(pair.base, root / "merged", instruct=pair.instruct, device="cpu")
    extract(pair.base, pair.instruct, root / "readapter", device="cpu")
    return {"merge": output_bytes(root / "merged"), "extract": output_bytes(root / "readapter")}


def command(kind: str, pair, out: Path, *extra) -> list[str]:
    args = ["merge", pair.base, "--instruct", pair.instruct] if kind == "merge" else ["extract", pair.base, pair.instruct]
    return [sys.executable, "-m", "stream_readapt.cli", *map(str, args), "-o", str(out), "--device", "cpu",
            "--quiet", *extra]


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def finished_shards(out: Path) -> int:
    for p in partials(out):
        try:
            return len(json.loads((p / JOURNAL_FILE).read_text())["shards"])
        except (OSError, ValueError):
            pass
    return 0


def start_and_signal(cmd, out: Path, sig: int, *, after_shards: int, delay: float) -> subprocess.CompletedProcess:
    """Start `cmd`; once `after_shards` shards are recorded (0: right away), wait `delay`, send `sig`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while after_shards and finished_shards(out) < after_shards and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never recorded a shard"
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def assert_clean(out: Path) -> None:
    assert not partials(out), partials(out)
    assert not (out / JOURNAL_FILE).exists() and not (out / OWNER_FILE).exists()


@pytest.mark.parametrize("kind", ["merge", "extract"])
def test_kill9_at_random_points_then_resume_gives_same_bytes(pair, reference, tmp_path, kind):
    """Three kill -9 at random points, each followed by --resume; the last resume finishes."""
    rng = random.Random(SEED)
    out = tmp_path / "out"
    for attempt in range(3):
        proc = start_and_signal(command(kind, pair, out, "--resume"), out, signal.SIGKILL,
                                after_shards=rng.randint(1, 3) if attempt == 0 else 1, delay=rng.uniform(0, 0.3))
        assert proc.returncode in (0, -signal.SIGKILL), (SEED, proc.stderr)
        if out.exists():  # finished (maybe killed while exiting): then it must be whole
            break
        # A kill while a resumed run adopts the previous partial may leave both; the next resume sorts it out.
        assert partials(out), f"seed {SEED}: a killed run left no partial to resume"
    else:
        done = subprocess.run(command(kind, pair, out, "--resume"), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (SEED, done.stderr)
    assert output_bytes(out) == reference[kind], f"seed {SEED}: resumed output differs from an uninterrupted run"
    assert_clean(out)


def test_kill9_leftovers_are_removed_by_the_next_run(pair, reference, tmp_path):
    out = tmp_path / "out"
    proc = start_and_signal(command("merge", pair, out), out, signal.SIGKILL, after_shards=1, delay=0)
    assert proc.returncode == -signal.SIGKILL
    assert len(partials(out)) == 1
    done = subprocess.run(command("merge", pair, out)[:-1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "partial output of a dead run" in done.stderr and "MB" in done.stderr, done.stderr  # with its size
    assert output_bytes(out) == reference["merge"]
    assert_clean(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_run_keeps_finished_shards_for_resume(pair, reference, tmp_path, sig):
    out = tmp_path / "out"
    proc = start_and_signal(command("merge", pair, out), out, sig, after_shards=2, delay=0)
    assert proc.returncode == 128 + sig, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "no output written" in err and "--resume" in err, err
    assert not out.exists()
    [kept] = partials(out)
    assert finished_shards(out) >= 2
    done = subprocess.run(command("merge", pair, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert output_bytes(out) == reference["merge"]
    assert_clean(out)


# The CLI with `import torch` held up for 5 s, so a signal 0.4 s in lands while torch loads
# whatever the machine's speed (a quiet machine finished the whole tiny merge in under 0.4 s).
SLOW_TORCH_CLI = (
    "import sys, time\n"
    "class SlowTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch':\n"
    "            time.sleep(5)\n"
    "sys.meta_path.insert(0, SlowTorch())\n"
    "from stream_readapt.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_start_up_is_one_line(pair, tmp_path, sig):
    """While torch is still being imported: no traceback, nothing left."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", SLOW_TORCH_CLI, *command("merge", pair, out)[3:]]
    proc = start_and_signal(cmd, out, sig, after_shards=0, delay=0.4)
    err = proc.stderr.strip()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not partials(out)


def test_two_runs_into_one_output(pair, reference, tmp_path):
    """Started together: exactly one succeeds, the other fails with one line, and the output is whole."""
    out = tmp_path / "out"
    procs = [subprocess.Popen(command("merge", pair, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.returncode, err.strip()) for p in procs for _, err in [p.communicate(timeout=300)]]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    failed = next(err for code, err in results if code != 0)
    # Refused as a live run's output, as a folder that appeared meanwhile, or (the other one done first) as not empty.
    assert len(failed.splitlines()) == 1 and any(w in failed for w in ("another run", "someone else", "not empty")), failed
    assert output_bytes(out) == reference["merge"]
    assert_clean(out)


def test_resume_refuses_other_options(pair, tmp_path):
    out = tmp_path / "out"
    proc = start_and_signal(command("merge", pair, out), out, signal.SIGTERM, after_shards=1, delay=0)
    assert proc.returncode == 128 + signal.SIGTERM
    done = subprocess.run(command("merge", pair, out, "--resume", "--beta", "0.25"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "that partial run had other" in done.stderr, done.stderr
    assert not out.exists() and len(partials(out)) == 1  # kept: the user may still resume it as it was


def test_resume_rewrites_a_recorded_shard_that_was_damaged(pair, reference, tmp_path, monkeypatch, caplog):
    """Sizes and checksums are verified on resume: a shard altered after it was recorded is redone."""
    from stream_readapt.io.writer import CheckpointWriter

    begin = CheckpointWriter.begin

    def stop_at_fifth_tensor_group(self, name, dtype, shape):
        if self._shard_index == 3 and name not in self.groups[3]:
            for done in self._syncs:
                done.result()  # shards 1-3 recorded (the 4th is still open)
            raise KeyboardInterrupt
        begin(self, name, dtype, shape)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(CheckpointWriter, "begin", stop_at_fifth_tensor_group)
        with pytest.raises(KeyboardInterrupt):
            merge(pair.base, out, instruct=pair.instruct, device="cpu")
    [kept] = partials(out)
    assert finished_shards(out) == 3
    with open(kept / "model-00002-of-00010.safetensors", "r+b") as fh:  # bit rot, same size
        fh.seek(-10, os.SEEK_END)
        fh.write(b"\x00" * 10)
    merge(pair.base, out, instruct=pair.instruct, device="cpu", resume=True)
    assert "model-00002-of-00010.safetensors does not match its recorded size/checksum" in caplog.text
    assert output_bytes(out) == reference["merge"]
    assert_clean(out)
