"""Before/after byte-identity check of extract / merge outputs over tiny model-zoo pairs.

    python bench/identity_check.py OUT.json [--families llama,gpt2,...|all] [--keep DIR]
    python bench/identity_check.py --compare A.json B.json

Builds tiny pairs with the test helpers (tests/zoo.py for dense families, tests/fixtures_moe.py
for mixture-of-experts ones), all with fixed seeds, then per family runs through the Python
API (device="cpu", quiet=True):

    full            extract(base, instruct)
    lore            extract(..., energy=0.5)                      (profile "peft")
    lore-<p>        extract(..., energy=0.5, profile=p)           p in vllm, sglang, llama.cpp, portable
    merge-instruct  merge(base, instruct=, knowledge=lora)
    merge-full      merge(base, readapter=full, knowledge=lora)
    merge-lore      merge(base, readapter=lore, knowledge=lora)

and records a hash of every file each output folder holds, {family: {output: {file: hash}}}:

- `raw:` sha256 of the file's bytes;
- `json:` manifest.json, and any other JSON file holding a temp path or a volatile key: the
  JSON with volatile keys (`created`: a wall-clock time stamp) dropped and the build root
  replaced by `<TMP>`, dumped canonically (sorted keys) and hashed;
- `st:` a safetensors file with a `__metadata__`: its header length, its header (tensor order
  kept; the metadata sorted by key, since the safetensors library writes it from a Rust
  HashMap whose order changes between processes, and normalised as above) and its data bytes;
- `sub:` another file naming the build root: its bytes with the root replaced by `<TMP>`.

Besides the files, each output records `<return>` (the manifest the API returned, normalised),
`<log>` (WARNING+ messages of the `stream_readapt.*` loggers, without logger names, which move
with modules) and, where the call raised, `<error>` (exception type and message, normalised):
a serving profile that refuses a family (fused MoE experts) shows up that way.
Each family also has an `_inputs` entry (hashes of base / instruct / lora files): `--compare`
compares a family's outputs only where its inputs match. `_meta` (versions, the files the
package was imported from, runtime) is informational.

The process re-executes itself with PYTHONHASHSEED=0: PEFT writes the knowledge adapter's
`target_modules` in set order (see tests/fixtures_models.py), and the merge manifests carry that
adapter's fingerprint. Compare runs made on one machine with one environment: the product code
sizes its thread pools from the CPU count, and float results may depend on it.

--compare exits 0 when everything compared is identical, 1 on any difference in outputs, and
2 when nothing differed but some family could not be compared (inputs differ or missing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

DENSE_DEFAULT = ["llama", "llama-tied", "qwen2", "gemma", "gpt2", "falcon", "phi3"]
MOE_ARCHS = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")  # tests/fixtures_moe.py
DEFAULT_FAMILIES = DENSE_DEFAULT + list(MOE_ARCHS)
PROFILES = ("vllm", "sglang", "llama.cpp", "portable")
ENERGY = 0.5
# Keys whose values change from run to run with the same inputs (found by diffing two runs):
# `created` is the manifest's UTC time stamp. Paths under the build root are substituted.
VOLATILE_KEYS = frozenset({"created"})
TMP = "<TMP>"


# ----------------------------------------------------------------------------- hashing

class Normaliser:
    """Replaces the build root (and its resolved form) in strings; drops volatile keys."""

    def __init__(self, root: Path):
        roots = {str(root), str(Path(root).resolve())}
        self.roots = sorted(roots, key=len, reverse=True)

    def text(self, s: str) -> str:
        for r in self.roots:
            s = s.replace(r, TMP)
        return s

    def obj(self, o):
        if isinstance(o, dict):
            return {self.text(k): self.obj(v) for k, v in o.items() if k not in VOLATILE_KEYS}
        if isinstance(o, (list, tuple)):
            return [self.obj(v) for v in o]
        if isinstance(o, str):
            return self.text(o)
        if isinstance(o, Path):
            return self.text(str(o))
        return o

    def embedded(self, s: str) -> str:
        """A string value: JSON objects inside it are normalised and dumped canonically."""
        if s[:1] in "{[":
            try:
                parsed = json.loads(s)
            except ValueError:
                parsed = None
            if isinstance(parsed, (dict, list)):
                norm = self.obj(parsed)
                return s if norm == parsed else canonical(norm)
        return self.text(s)


def canonical(o) -> str:
    return json.dumps(o, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(path: Path, raw: bytes, norm: Normaliser) -> str:
    try:
        obj = json.loads(raw)
    except ValueError:
        return hash_other(raw, norm)
    normed = norm.obj(obj)
    if path.name != "manifest.json" and normed == obj:
        return "raw:" + sha(raw)
    return "json:" + sha(canonical(normed).encode())


def hash_safetensors(raw: bytes, norm: Normaliser) -> str:
    if len(raw) < 8:
        return "raw:" + sha(raw)
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8:8 + n])  # dict keeps the file's order
    except ValueError:
        return "raw:" + sha(raw)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        return "raw:" + sha(raw)
    # The safetensors library writes `__metadata__` from a Rust HashMap: its key order changes
    # from process to process (seen on the serving profiles' rewritten adapters), so a file
    # with metadata is always hashed with it sorted (and normalised); the rest of the header
    # keeps the file's order, and its length (padding included) is hashed too.
    header["__metadata__"] = {norm.text(k): norm.embedded(v) if isinstance(v, str) else v
                              for k, v in sorted(meta.items())}
    h = hashlib.sha256()
    h.update(f"{n}\0".encode())
    h.update(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    h.update(b"\0")
    h.update(raw[8 + n:])
    return "st:" + h.hexdigest()


def hash_other(raw: bytes, norm: Normaliser) -> str:
    sub = raw
    for r in norm.roots:
        sub = sub.replace(r.encode(), TMP.encode())
    return ("raw:" if sub == raw else "sub:") + sha(sub)


def hash_file(path: Path, norm: Normaliser) -> str:
    raw = path.read_bytes()
    if path.suffix == ".json":
        return hash_json(path, raw, norm)
    if path.suffix == ".safetensors":
        return hash_safetensors(raw, norm)
    return hash_other(raw, norm)


def hash_folder(folder: Path, norm: Normaliser) -> dict[str, str]:
    if not folder.exists():
        return {}
    if folder.is_file():
        return {folder.name: hash_file(folder, norm)}
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + norm.text(os.readlink(p))
        elif p.is_file():
            out[rel] = hash_file(p, norm)
        elif p.is_dir() and not any(p.iterdir()):
            out[rel + "/"] = "empty-dir"
    return out


# ----------------------------------------------------------------------------- building

def build_pair(name: str, root: Path):
    """(base, instruct, lora) folders of family `name`, built with fixed seeds."""
    import fixtures_moe
    import zoo

    if name in zoo.BY_NAME:
        m = zoo.build_family(zoo.BY_NAME[name], root, seed=0)
        return m.base, m.instruct, m.lora
    if name in MOE_ARCHS:
        pair = fixtures_moe.build_moe_pair(name, root, seed=0)
        lora = fixtures_moe.build_moe_adapter(pair.base, root / "lora", fixtures_moe.moe_lora_config(name), seed=3)
        return pair.base, pair.instruct, lora
    known = [f.name for f in zoo.FAMILIES] + list(MOE_ARCHS)
    raise SystemExit(f"unknown family {name!r}: choose from {', '.join(known)}")


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        try:
            self.messages.append(f"{record.levelname}: {record.getMessage()}")
        except Exception as e:  # noqa: BLE001  (a broken log call is behaviour too)
            self.messages.append(f"{record.levelname}: <unformattable {type(e).__name__}>")


def run_output(fn, out: Path, norm: Normaliser) -> dict[str, str]:
    """Run `fn()` (writes `out`), return the hashes of `out` plus <return>/<log>/<error>."""
    cap = LogCapture()
    log = logging.getLogger("stream_readapt")
    log.addHandler(cap)
    old_level = log.level
    if log.getEffectiveLevel() > logging.WARNING:
        log.setLevel(logging.WARNING)
    result: dict[str, str] = {}
    try:
        returned = fn()
        result["<return>"] = "json:" + sha(canonical(norm.obj(returned)).encode())
    except Exception as e:  # noqa: BLE001  (recorded, compared like any output)
        msg = " ".join(norm.text(str(e)).split())
        result["<error>"] = f"{type(e).__name__}: {msg}"
    finally:
        log.removeHandler(cap)
        log.setLevel(old_level)
    if cap.messages:
        result["<log>"] = "log:" + sha("\n".join(norm.text(m) for m in cap.messages).encode())
    result.update(hash_folder(out, norm))
    return result


def check_family(name: str, root: Path, norm: Normaliser) -> dict[str, dict[str, str]]:
    from stream_readapt import extract, merge

    base, instruct, lora = build_pair(name, root / "models")
    out = root / "out"
    out.mkdir()
    res = {"_inputs": {f"{side}/{k}": v for side, path in (("base", base), ("instruct", instruct), ("lora", lora))
                       for k, v in hash_folder(path, norm).items()}}
    common = {"device": "cpu", "quiet": True}
    res["full"] = run_output(lambda: extract(base, instruct, out / "full", **common), out / "full", norm)
    res["lore"] = run_output(lambda: extract(base, instruct, out / "lore", energy=ENERGY, **common), out / "lore", norm)
    for p in PROFILES:
        folder = out / f"lore-{p}"
        res[f"lore-{p}"] = run_output(
            lambda folder=folder, p=p: extract(base, instruct, folder, energy=ENERGY, profile=p, **common),
            folder, norm)
    res["merge-instruct"] = run_output(
        lambda: merge(base, out / "merge-instruct", instruct=instruct, knowledge=lora, **common),
        out / "merge-instruct", norm)
    res["merge-full"] = run_output(
        lambda: merge(base, out / "merge-full", readapter=out / "full", knowledge=lora, **common),
        out / "merge-full", norm)
    res["merge-lore"] = run_output(
        lambda: merge(base, out / "merge-lore", readapter=out / "lore", knowledge=lora, **common),
        out / "merge-lore", norm)
    return res


def imported_from() -> dict[str, str]:
    mods = {}
    for name in ("stream_readapt", "stream_readapt.kernels"):
        m = sys.modules.get(name)
        if m is not None and getattr(m, "__file__", None):
            mods[name] = m.__file__
    return mods


def build_main(args) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve())] + sys.argv[1:])
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(REPO))  # the package of this checkout, before any installed copy
    import peft
    import torch
    import transformers

    import stream_readapt

    families = [f for f in args.families.split(",") if f] if args.families else DEFAULT_FAMILIES
    if families == ["all"]:
        import zoo

        families = [f.name for f in zoo.FAMILIES] + list(MOE_ARCHS)
    start = time.perf_counter()
    out_json = Path(args.out).resolve()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="identity_check_"))
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    norm = Normaliser(root)
    result: dict = {}
    cwd = os.getcwd()
    # Every path handed to the builders and the API is relative to the build root, so manifests,
    # safetensors metadata and the fingerprints of outputs read back as inputs (a readapter's
    # header holds its inputs' paths) are the same whatever the temp dir is called.
    os.chdir(root)
    try:
        for name in families:
            t0 = time.perf_counter()
            fam_root = Path(name)
            fam_root.mkdir()
            try:
                result[name] = check_family(name, fam_root, norm)
            except SystemExit:
                raise
            except Exception as e:  # noqa: BLE001  (building failed: record it, go on)
                traceback.print_exc()
                result[name] = {"_build_error": {"<error>": f"{type(e).__name__}: {norm.text(str(e))}"}}
            errs = [o for o, files in result[name].items() if "<error>" in files]
            print(f"{name}: {len(result[name]) - 1} outputs in {time.perf_counter() - t0:.1f}s"
                  + (f" (raised: {', '.join(errs)})" if errs else ""), file=sys.stderr, flush=True)
    finally:
        os.chdir(cwd)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    pkg_root = Path(stream_readapt.__file__).resolve().parent.parent
    result["_meta"] = {
        "families": families,
        "imported_from": imported_from(),
        "repo": str(REPO),
        "seconds": round(time.perf_counter() - start, 1),
        "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "cpus": os.cpu_count(),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
    }
    if pkg_root != REPO:
        print(f"warning: stream_readapt imported from {pkg_root}, not {REPO}", file=sys.stderr)
    out_json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({result['_meta']['seconds']}s; stream_readapt from {stream_readapt.__file__})",
          file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- comparing

def compare(a_path: str, b_path: str) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    diffs, skipped, same_outputs = [], [], 0
    for key in ("python", "torch", "transformers", "peft", "cpus", "pythonhashseed"):
        va, vb = a.get("_meta", {}).get(key), b.get("_meta", {}).get(key)
        if va != vb:
            print(f"note: _meta.{key} differs: {va!r} vs {vb!r} (results may differ for that reason)")
    families = sorted((set(a) | set(b)) - {"_meta"})
    for fam in families:
        if fam not in a or fam not in b:
            skipped.append(f"{fam}: only in {'A' if fam in a else 'B'}")
            continue
        fa, fb = a[fam], b[fam]
        if fa.get("_inputs") != fb.get("_inputs"):
            ia, ib = fa.get("_inputs", {}), fb.get("_inputs", {})
            bad = sorted(k for k in set(ia) | set(ib) if ia.get(k) != ib.get(k))
            skipped.append(f"{fam}: inputs differ ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); outputs not compared")
            continue
        for out in sorted((set(fa) | set(fb)) - {"_inputs"}):
            oa, ob = fa.get(out), fb.get(out)
            if oa is None or ob is None:
                diffs.append(f"{fam}/{out}: only in {'A' if ob is None else 'B'}")
                continue
            bad = False
            for f in sorted(set(oa) | set(ob)):
                ha, hb = oa.get(f), ob.get(f)
                if ha != hb:
                    bad = True
                    if ha is None or hb is None:
                        diffs.append(f"{fam}/{out}/{f}: only in {'A' if hb is None else 'B'}")
                    elif f == "<error>":
                        diffs.append(f"{fam}/{out}/<error>:\n    A: {ha}\n    B: {hb}")
                    else:
                        diffs.append(f"{fam}/{out}/{f}: {ha[:24]}... vs {hb[:24]}...")
            same_outputs += not bad
    for line in skipped:
        print("NOT COMPARED " + line)
    for line in diffs:
        print("DIFF " + line)
    n_fam = len(families) - len(skipped)
    print(f"{n_fam} families compared, {same_outputs} outputs identical, {len(diffs)} differences, "
          f"{len(skipped)} families not compared")
    return 1 if diffs else (2 if skipped else 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="JSON file to write")
    ap.add_argument("--families", help=f"comma-separated zoo (tests/zoo.py) or MoE ({', '.join(MOE_ARCHS)}) "
                    f"family names, or 'all' (default: {','.join(DEFAULT_FAMILIES)})")
    ap.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: a temp dir, removed)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two result files")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give OUT.json, or --compare A B")
    return build_main(args)


if __name__ == "__main__":
    sys.exit(main())
