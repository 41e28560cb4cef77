"""The engine's reliability rules, in process: ownership of -o, stale partials, free space,
inputs changing mid-run, which file transformers loads, JSON size caps, fsyncs, adapters
that PEFT would apply to another base, and one-line causes for the rest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess

import pytest
import torch

import fixtures_models as fm
from stream_readapt import merge
from stream_readapt.io.checkpoint import Checkpoint
from stream_readapt.cli import main
from stream_readapt.io.jsonfile import load_json_object
from stream_readapt.io.ownership import OWNER_FILE, OutputFolder
from stream_readapt.terms.peft_adapter import PeftAdapter
from stream_readapt.io.safetensors_reader import CheckpointError
from stream_readapt.io.writer import CheckpointWriter


def partials(out):
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args] + ["--quiet"])
    return code, capsys.readouterr().err.strip()


# -- ownership -------------------------------------------------------------------------------
def test_folder_appearing_during_the_run_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="someone else"):
        with OutputFolder(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"ours")
            out.mkdir()
            (out / "theirs.txt").write_text("precious")
    assert (out / "theirs.txt").read_text() == "precious" and sorted(os.listdir(out)) == ["theirs.txt"]


def test_folder_filled_between_the_checks_and_the_start_is_kept(tmp_path):
    out = tmp_path / "out"
    owned = OutputFolder(out)  # checked here; inputs are opened and planned before entering
    out.mkdir()
    (out / "theirs.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        with owned:
            pass
    assert sorted(os.listdir(out)) == ["theirs.txt"] and not partials(out)


def test_overwrite_refuses_a_folder_swapped_in_during_the_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="someone else"):
        with OutputFolder(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            shutil.rmtree(out)
            out.mkdir()
            (out / "theirs.txt").write_text("precious")
    assert sorted(os.listdir(out)) == ["theirs.txt"]


def test_same_pid_in_two_containers_do_not_collide(tmp_path, monkeypatch):
    """Two runs that are both PID 1 (two containers): distinct partials, and the later one stops."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    out = tmp_path / "out"
    first = OutputFolder(out)
    tmp = first.__enter__()
    (tmp / "a.txt").write_text("first")
    monkeypatch.setattr(socket, "gethostname", lambda: "other-container")
    with pytest.raises(FileExistsError, match="another run .*pid 1"):
        with OutputFolder(out):
            pass
    assert (tmp / "a.txt").read_text() == "first" and partials(out) == [tmp]
    first.__exit__(None, None, None)
    assert (out / "a.txt").read_text() == "first" and not partials(out)
    assert not (out / OWNER_FILE).exists()


def test_stale_partials_removed_with_their_size_and_foreign_ones_listed(tmp_path, caplog):
    out = tmp_path / "out"
    dead = tmp_path / ".out.partial-host-4242-deadbeef"
    dead.mkdir()
    (dead / OWNER_FILE).write_text(json.dumps({"host": "host", "pid": 4242, "token": "deadbeef", "started_ns": 1}))
    (dead / "model.safetensors").write_bytes(b"x" * 3000)
    foreign = tmp_path / ".out.partial-77"  # an older version's: no owner file
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"y" * 5000)
    with caplog.at_level(logging.WARNING), OutputFolder(out) as tmp:
        (tmp / "f").write_text("ok")
    assert not dead.exists() and foreign.exists()
    assert "dead run" in caplog.text and "3.1 KB" in caplog.text  # its shard and owner file
    assert str(foreign) in caplog.text and "5.0 KB" in caplog.text


# -- free space ------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path, monkeypatch):
    """A 1 MiB tmpfs when this machine lets us mount one, else a file system that says 1 MiB is free."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**20))
    yield mnt
    if mounted:
        subprocess.run(["umount", str(mnt)], check=True)


def test_free_space_checked_before_writing(llama_pair, small_fs, capsys):
    out = small_fs / "out"
    code, err = cli(capsys, "merge", llama_pair.base, "--instruct", llama_pair.instruct, "-o", out)
    assert code == 1 and len(err.splitlines()) == 1 and "not enough free space" in err, err
    assert list(small_fs.iterdir()) == []  # not a byte written, nothing left


# -- inputs ----------------------------------------------------------------------------------
def test_input_rewritten_mid_run_is_refused(llama_pair, tmp_path, monkeypatch):
    base = shutil.copytree(llama_pair.base, tmp_path / "base")
    last = sorted(base.glob("model-*.safetensors"))[-1]
    close = CheckpointWriter._close_shard

    def close_then_rewrite(self):
        close(self)
        with open(last, "r+b") as fh:  # in place, same size: another job re-saving the shard
            fh.seek(-64, os.SEEK_END)
            # other finite float32 values (random bytes could spell NaN, which would fail the
            # run for that reason first)
            fh.write((torch.rand(16) + 2.0).numpy().tobytes())

    monkeypatch.setattr(CheckpointWriter, "_close_shard", close_then_rewrite)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="input changed during the run"):
        merge(base, out, instruct=llama_pair.instruct, device="cpu")
    assert not out.exists() and not partials(out)


def test_single_file_wins_over_an_index_as_in_transformers(llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    mixed = shutil.copytree(llama_pair.base, tmp_path / "mixed")  # index + 3 shards of the base
    shutil.copy(llama_pair.instruct / "model.safetensors", mixed / "model.safetensors")  # instruct weights
    loaded = AutoModelForCausalLM.from_pretrained(mixed, dtype=torch.float32).state_dict()
    with Checkpoint.from_folder(mixed) as ckpt:
        for name in ckpt.names:
            assert torch.equal(ckpt.read(name), loaded[name]), name


def test_json_size_capped_before_parsing(tmp_path):
    junk = tmp_path / "config.json"
    with open(junk, "wb") as fh:  # 1 GB, sparse: no disk used
        fh.truncate(2**30)
    with pytest.raises(CheckpointError, match="limit for a JSON file"):
        load_json_object(junk)
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"a": "x" * 5000}))
    with pytest.raises(CheckpointError, match="limit"):
        load_json_object(small, limit=1000)
    assert load_json_object(small)["a"] == "x" * 5000


def test_config_symlink_loop_is_an_error(llama_pair, tmp_path, capsys):
    instruct = shutil.copytree(llama_pair.instruct, tmp_path / "instruct")
    (instruct / "config.json").unlink()
    os.symlink(instruct / "loop.json", instruct / "config.json")
    os.symlink(instruct / "config.json", instruct / "loop.json")
    out = tmp_path / "out"
    code, err = cli(capsys, "merge", llama_pair.base, "--instruct", instruct, "-o", out)
    assert code == 1 and len(err.splitlines()) == 1 and "config.json: broken symlink" in err, err
    assert not out.exists() and not partials(out)


# -- durability ------------------------------------------------------------------------------
def test_files_and_folders_fsynced_around_the_rename(llama_pair, tmp_path, monkeypatch):
    events = []
    fsync, rename = os.fsync, os.rename

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record_fsync)
    out = tmp_path / "out"
    merge(llama_pair.base, out, instruct=llama_pair.instruct, device="cpu")
    synced = [path for _, path in events]
    tmp_prefix = str(tmp_path / ".out.partial-")
    for name in ("manifest.json", "config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors"):
        assert any(p.startswith(tmp_prefix) and p.endswith("/" + name) for p in synced), name
    assert any(p.startswith(tmp_prefix) and "/" not in p[len(tmp_prefix):] for p in synced), "partial folder"
    assert synced[-1] == str(tmp_path), "the parent folder, after the rename"


# -- adapters --------------------------------------------------------------------------------
def _edited_adapter(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "corda", "loftq"])
def test_adapters_made_for_a_changed_base_are_refused(lora_adapter, tmp_path, init):
    adapter = _edited_adapter(lora_adapter, tmp_path / "a", init_lora_weights=init)
    with pytest.raises(CheckpointError, match=f"init_lora_weights = '{init}': PEFT changed the base"):
        PeftAdapter(adapter)


def test_plain_init_variants_still_merge(lora_adapter, tmp_path):
    for init in (True, False, "gaussian", "eva"):
        PeftAdapter(_edited_adapter(lora_adapter, tmp_path / str(init), init_lora_weights=init)).close()


def test_trainable_tokens_named_as_such(llama_pair, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    adapter = fm.build_adapter(llama_pair.base, tmp_path / "tt", config, steps=1)
    with pytest.raises(CheckpointError, match="trainable_token_indices .* is not supported"):
        PeftAdapter(adapter)


def test_warns_when_the_config_names_another_base(llama_pair, lora_adapter, tmp_path, caplog):
    adapter = _edited_adapter(lora_adapter, tmp_path / "a", base_model_name_or_path="Qwen/Qwen2-7B",
                              auto_mapping={"base_model_class": "Qwen2ForCausalLM", "parent_library": "x"})
    for folder, expect in ((adapter, True), (lora_adapter, False)):
        caplog.clear()
        psi = PeftAdapter(folder)
        with caplog.at_level(logging.WARNING), Checkpoint.open(llama_pair.base) as base:
            psi.check_base(base)
        psi.close()
        if expect:
            assert "base_model_name_or_path is 'Qwen/Qwen2-7B'" in caplog.text
            assert "auto_mapping.base_model_class is 'Qwen2ForCausalLM'" in caplog.text
    assert "base_model_name_or_path" not in caplog.text and "auto_mapping" not in caplog.text


def test_lore_allocation_failure_names_the_tensor(llama_pair, tmp_path, capsys, monkeypatch):
    import stream_readapt.lowrank.lore as lore

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(lore, "randomized_svd", no_memory)
    out = tmp_path / "out"
    code, err = cli(capsys, "extract", llama_pair.base, llama_pair.instruct, "-o", out, "--rank", "2")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "tensor 'model." in err and "not enough memory on cpu" in err, err
    assert not out.exists() and not partials(out)
