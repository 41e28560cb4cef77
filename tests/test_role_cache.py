"""The on-disk cache of role tables (role_cache.py): a hit is the table a fresh derivation gives,
across the zoo; anything wrong with an entry or the cache folder falls back to deriving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import fixtures_moe
import zoo
from stream_readapt.arch import role_cache, roles
from stream_readapt.arch.roles import role_table

pytest.importorskip("transformers")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache switched on, in a folder of this test's own (conftest switches it off)."""
    monkeypatch.setenv("STREAM_READAPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "roles"


def _config_and_keys(config) -> tuple[dict, list[str]]:
    """A config.json as save_pretrained writes it, and the model's own tensor names (built on meta)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # a multimodal wrapper (Qwen2.5-VL, Mistral-3)
            model = AutoModelForImageTextToText.from_config(config)
    return json.loads(config.to_json_string()), list(model.state_dict())


def _no_derivation(monkeypatch):
    def refuse(_config_json):
        raise AssertionError("the table was derived again instead of read from the cache")

    monkeypatch.setattr(roles, "meta_build", refuse)


def _same(a: roles.RoleTable, b: roles.RoleTable) -> None:
    assert a.model_type == b.model_type and a.derived and b.derived
    assert a.roles == b.roles  # every key: parameter name, role, class, embedding scale, tie, placement, reach
    assert list(a.params.items()) == list(b.params.items())  # every parameter, in model order


ZOO_CONFIGS = [pytest.param(lambda f=f: zoo.tiny_config(f), id=f.name) for f in zoo.FAMILIES] + [
    pytest.param(lambda a=a: fixtures_moe.moe_config(a), id=a) for a in fixtures_moe.MOE_ARCHS]


@pytest.mark.parametrize("make_config", ZOO_CONFIGS)
def test_cached_table_is_the_derived_table(make_config, cache, monkeypatch):
    config, keys = _config_and_keys(make_config())
    derived = role_table(config, keys)
    assert len(list(cache.glob("*.json"))) == 1
    _no_derivation(monkeypatch)
    _same(role_table(config, keys), derived)


def _llama():
    return _config_and_keys(zoo.tiny_config(zoo.BY_NAME["llama"]))


@pytest.mark.parametrize("damage", [
    b"", b"{", b"\xff\xfe not utf-8", b"[1, 2]", b'{"format": 99}',
    b'{"format": 1, "key": "someone else", "model_type": "llama", "roles": []}',
    "bad role", "short row", "huge",
])
def test_damaged_entry_is_derived_again_and_replaced(damage, cache):
    config, keys = _llama()
    derived = role_table(config, keys)
    entry = next(cache.glob("*.json"))
    good = json.loads(entry.read_text())
    if damage == "bad role":
        good["roles"][0][2] = "not-a-role"
        damage = json.dumps(good).encode()
    elif damage == "short row":
        good["roles"][0] = good["roles"][0][:3]
        damage = json.dumps(good).encode()
    elif damage == "huge":
        damage = b" " * (role_cache.MAX_ENTRY_BYTES + 1)
    entry.write_bytes(damage)
    _same(role_table(config, keys), derived)
    _same(role_cache.load(entry.stem), derived)  # the damaged entry was rewritten whole


def test_entry_depends_on_config_keys_transformers_and_roles_source(cache, monkeypatch):
    config, keys = _llama()
    text = roles.config_key(config)
    key = role_cache.entry_key(text, keys)
    other_config = roles.config_key({**config, "tie_word_embeddings": not config["tie_word_embeddings"]})
    assert role_cache.entry_key(other_config, keys) != key
    assert role_cache.entry_key(text, keys[:-1]) != key
    monkeypatch.setattr(role_cache.importlib.metadata, "version", lambda name: "0.0.0-another")
    assert role_cache.entry_key(text, keys) != key
    monkeypatch.undo()
    monkeypatch.setenv("STREAM_READAPT_CACHE", str(cache.parent))
    real_read = role_cache.Path.read_bytes
    monkeypatch.setattr(role_cache.Path, "read_bytes",
                        lambda p: real_read(p) + (b"# edited" if p.name == "roles.py" else b""))
    role_cache._roles_source_digest.cache_clear()  # read once per process: as if this one started edited
    try:
        assert role_cache.entry_key(text, keys) != key  # an edited roles.py never reads old entries
    finally:
        monkeypatch.undo()
        role_cache._roles_source_digest.cache_clear()


def test_unwritable_cache_folder_costs_only_time(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("STREAM_READAPT_CACHE", str(blocker))  # roles/ cannot be made under a file
    config, keys = _llama()
    table = role_table(config, keys)
    assert table.derived and table.of("lm_head.weight").role is roles.Role.LM_HEAD
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("setting", ["off", ""])
def test_cache_off_writes_nothing(setting, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAM_READAPT_CACHE", setting)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    role_table(*_llama())
    assert role_cache.cache_folder() is None and not any(tmp_path.iterdir())


def test_cache_keeps_the_most_recently_used_entries(cache, monkeypatch):
    config, keys = _llama()
    key_of = lambda n: role_cache.entry_key(roles.config_key(config), keys[:n])
    for n in (-1, -2, -3):
        role_table(config, keys[:n])
        os.utime(cache / f"{key_of(n)}.json", ns=(10**18 + n * 10**9,) * 2)  # stored long ago, in this order
    monkeypatch.setattr(role_cache, "MAX_ENTRIES", 2)
    assert role_cache.load(key_of(-2)) is not None  # a hit counts as a use
    role_table(config, keys[:-4])
    left = {p.stem for p in cache.glob("*.json")}
    assert left == {key_of(-2), key_of(-4)}


def test_default_location_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAM_READAPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert role_cache.cache_folder() == tmp_path / "stream_readapt" / "roles"


def test_name_only_and_refused_tables_are_not_stored(cache):
    role_table({"model_type": "no-such-architecture", "num_hidden_layers": 2}, ["w.weight"])
    role_table({"model_type": "llama", "num_hidden_layers": 5000}, ["w.weight"])
    assert not cache.exists() or not any(cache.iterdir())


def test_second_merge_skips_transformers_and_writes_the_same_bytes(llama_pair, lora_adapter, tmp_path):
    """End to end, in fresh processes: the first merge stores the tables, the second reads them,
    never imports transformers, and its output is byte for byte the first's."""
    script = textwrap.dedent("""
        import sys
        from stream_readapt import merge
        merge(sys.argv[1], sys.argv[2], instruct=sys.argv[3], knowledge=sys.argv[4], device="cpu")
        print("transformers imported:", "transformers" in sys.modules)
    """)
    env_cache = tmp_path / "cache"
    outs = []
    for run in ("first", "second"):
        out = tmp_path / run
        proc = subprocess.run([sys.executable, "-c", script, str(llama_pair.base), str(out), str(llama_pair.instruct),
                               str(lora_adapter)], capture_output=True, text=True,
                              env={**_env(), "STREAM_READAPT_CACHE": str(env_cache)})
        assert proc.returncode == 0, proc.stderr
        outs.append((out, proc.stdout.strip()))
    assert outs[0][1] == "transformers imported: True" and outs[1][1] == "transformers imported: False"
    first, second = (sorted(p for p in o.rglob("*") if p.is_file()) for o, _ in outs)
    assert [p.relative_to(outs[0][0]) for p in first] == [p.relative_to(outs[1][0]) for p in second]
    for a, b in zip(first, second):
        if a.name == "manifest.json":  # the same but for its creation time
            a, b = (json.loads(p.read_text()) for p in (a, b))
            assert a.pop("created") and b.pop("created") and a == b
        else:
            assert a.read_bytes() == b.read_bytes(), a.name


def _env() -> dict:
    return dict(os.environ)


@pytest.mark.parametrize("damage", ["world-writable", "fifo", "symlink"])
def test_an_entry_others_could_have_written_is_ignored_with_a_warning(damage, cache, caplog, tmp_path):
    """A cache entry is input like any file read back: a FIFO must not hang the run, and an entry
    another user could write (a hand-edited `q_proj` marked conv1d made a merge 28% off) is
    derived again, not trusted."""
    config, keys = _llama()
    derived = role_table(config, keys)
    (entry,) = cache.glob("*.json")
    if damage == "world-writable":
        entry.chmod(0o666)
    elif damage == "fifo":
        entry.unlink()
        os.mkfifo(entry)
    else:
        target = tmp_path / "elsewhere.json"
        entry.rename(target)
        entry.symlink_to(target)
    with caplog.at_level("WARNING"):
        again = role_table(config, keys)
    _same(again, derived)
    assert "role cache: ignoring" in caplog.text


def test_trimming_never_removes_files_that_are_not_entries(cache, monkeypatch):
    cache.mkdir(parents=True)
    mine = [cache / f"notes-{i}.json" for i in range(5)] + [cache / ("a" * 64 + ".txt")]
    for p in mine:
        p.write_text("{}")
    monkeypatch.setattr(role_cache, "MAX_ENTRIES", 1)
    for n in (1, 2, 3):
        role_table(*_config_and_keys(zoo.tiny_config(zoo.Family(f"l{n}", "llama", {**zoo._LLAMA_LIKE,
                                                                                   "num_hidden_layers": n}))))
    assert all(p.exists() for p in mine)
    assert len([p for p in cache.glob("*.json") if len(p.stem) == 64]) == 1
