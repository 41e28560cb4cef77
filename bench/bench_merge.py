"""Benchmark `stream-readapt merge` against a plain copy of the same bytes and against mergekit.

For one preset (see make_checkpoints.py), side by side in one run, each as a fresh child
process (wall time and peak RSS from `/usr/bin/time -v`):
  copy        read base + instruct + adapter, write base-size bytes, fsync: the I/O floor;
  ours        stream-readapt merge BASE --instruct INSTRUCT --knowledge LORA --alpha 0.5 --beta 0.5;
  mergekit    mergekit-yaml, task_arithmetic: BASE + 0.5·(INSTRUCT − BASE) + 0.5·(BASE+LORA − BASE),
              the same Ω; mergekit merges the LoRA into a full copy of the base first (with
              transformers + peft, inside the same process), and that step is part of its time.
Then checks ours against mergekit and both against a float64 recomputation, and writes
bench/out/merge_<preset>.json / .csv. Inputs are read once before each timed run, so all
runs start with the same (warm) page cache; outputs go to disk and are fsync'ed.

    python bench/bench_merge.py --preset 1b [--workdir /tmp/bench-data] [--skip-mergekit] [--keep]
        [--cache cold|warm] [--role-cache cold|warm] [--repeat N]

mergekit lives in its own venv (bench/.venv-mergekit, see --mergekit-bin); without it the
mergekit row is skipped with a note.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import harness_cpu as hc
import make_checkpoints as mc
import merge_check as check
import torch

from stream_readapt.io.checkpoint import Checkpoint

HERE = Path(__file__).resolve().parent
DEFAULT_MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"
ALPHA = BETA = 0.5
GB = 1e9


@dataclass
class Setup:
    """Where one preset's inputs and outputs live, and the bytes a merge must move."""

    preset: str
    inputs: dict[str, Path]
    runs: Path
    read_bytes: int
    write_bytes: int
    cache: str = "cold"
    role_cache: str = "warm"

    @classmethod
    def build(cls, preset: str, workdir: Path) -> Setup:
        inputs = mc.build(preset, workdir)
        read = sum(hc.folder_bytes(inputs[k]) for k in ("base", "instruct", "lora"))
        return cls(preset, inputs, Path(workdir) / preset / "runs", read, hc.folder_bytes(inputs["base"]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(mc.PRESETS), required=True, help="model shape (make_checkpoints.py)")
    p.add_argument("--workdir", type=Path, default=Path(mc.DEFAULT_WORKDIR), help="inputs and outputs (big)")
    p.add_argument("--out-dir", type=Path, default=HERE / "out", help="where merge_<preset>.json/.csv go")
    p.add_argument("--mergekit-bin", type=Path, default=DEFAULT_MERGEKIT, help="mergekit-yaml to compare with")
    p.add_argument("--skip-mergekit", action="store_true", help="time only the copy and ours")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold",
                   help="inputs evicted from the page cache before each run (cold, like a 70B model that cannot "
                        "fit) or read in beforehand (warm)")
    p.add_argument("--role-cache", choices=["cold", "warm"], default="warm",
                   help="stream-readapt's cache of role tables (role_cache.py): empty before each run of ours, as on "
                        "a machine's first run (cold), or primed once beforehand (warm, every later run)")
    p.add_argument("--repeat", type=int, default=1, help="runs of copy and ours (alternating); mergekit runs once")
    p.add_argument("--keep", action="store_true", help="keep the merged outputs (default: removed after checking)")
    p.add_argument("--verify-only", action="store_true", help="no timing: check the outputs a --keep run left")
    return p.parse_args(argv)


def check_disk(preset: str, workdir: Path, with_mergekit: bool) -> None:
    """Fail before starting when the outputs (and any inputs still to build) cannot fit."""
    sizes = mc.preset_bytes(preset)
    built = (workdir / preset / "complete.json").is_file()
    need = (0 if built else 2 * sizes["model"] + sizes["adapter"]) + sizes["model"] * (3 if with_mergekit else 2)
    need += 2 * GB  # margin for logs, side files and the file system
    probe = next(p for p in [workdir, *workdir.parents] if p.exists())
    free = shutil.disk_usage(probe).free
    if free < need:
        sys.exit(f"bench_merge: need ~{need / GB:.1f} GB free under {workdir}, have {free / GB:.1f} GB "
                 "(free some space, pass --workdir elsewhere, or --skip-mergekit)")


def stream_readapt_cmd() -> list[str]:
    exe = shutil.which("stream-readapt", path=str(Path(sys.executable).parent)) or shutil.which("stream-readapt")
    return [exe] if exe else [sys.executable, "-m", "stream_readapt.cli"]


def copy_cmd(s: Setup, out: Path) -> list[str]:
    return [sys.executable, str(HERE / "copy_floor.py"), str(s.inputs["base"]), str(s.inputs["instruct"]),
            str(s.inputs["lora"]), "-o", str(out)]


def ours_cmd(s: Setup, out: Path) -> list[str]:
    return [*stream_readapt_cmd(), "merge", str(s.inputs["base"]), "--instruct", str(s.inputs["instruct"]),
            "--knowledge", str(s.inputs["lora"]), "-o", str(out), "--alpha", str(ALPHA), "--beta", str(BETA),
            "--quiet", "--device", "cpu"]


def mergekit_yaml(s: Setup) -> str:
    base, instruct, lora = (str(s.inputs[k]) for k in ("base", "instruct", "lora"))
    assert "+" not in base + lora, "mergekit splits model references at '+'"
    return (f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: bfloat16\nmodels:\n"
            f"  - model: {instruct}\n    parameters: {{weight: {BETA}}}\n"
            f"  - model: {base}+{lora}\n    parameters: {{weight: {ALPHA}}}\n")


def mergekit_cmd(s: Setup, out: Path, mergekit_bin: Path) -> list[str]:
    config = s.runs / "mergekit.yaml"
    config.write_text(mergekit_yaml(s))
    return [str(mergekit_bin), str(config), str(out), "--lora-merge-cache", str(s.runs / "mergekit-lora-cache"),
            "--lora-merge-dtype", "bfloat16", "--device", "cpu", "--lazy-unpickle",
            "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def time_tool(s: Setup, tool: str, cmd: list[str], run: int) -> dict:
    """One timed run from the chosen page-cache state, outputs fsync'ed; a result row."""
    inputs = [s.inputs[k] for k in ("base", "instruct", "lora")]
    (hc.evict_page_cache if s.cache == "cold" else hc.warm_page_cache)(inputs)
    cached = hc.cached_fraction(inputs)
    env = hc.role_cache_env(s.role_cache, s.runs / "role-cache") if tool == "ours" else None
    stats = hc.run_timed(cmd, s.runs / f"{tool}-{run}.log", env=env)
    hc.remove(s.runs / "mergekit-lora-cache")  # else a second mergekit run would skip its LoRA merge
    gbps = (s.read_bytes + s.write_bytes) / GB / stats["wall_s"]
    print(f"  {tool:9s} run {run}: {stats['wall_s']:.1f} s, peak RSS {stats['peak_rss_mb']:.0f} MB, "
          f"other processes used {stats['others_cpu_s']:.0f} CPU-s meanwhile", flush=True)
    return {"preset": s.preset, "tool": tool, "run": run, "cache": s.cache, "inputs_cached": cached,
            "role_cache": s.role_cache if tool == "ours" else "", **stats,
            "read_gb": s.read_bytes / GB,
            "written_gb": s.write_bytes / GB, "gb_per_s": gbps}


def run_copy_and_ours(s: Setup, repeat: int) -> list[dict]:
    """Alternating copy / ours runs; the copy's output is removed at once, ours' last is kept."""
    rows = []
    for run in range(1, repeat + 1):
        rows.append(time_tool(s, "copy", copy_cmd(s, s.runs / "copy"), run))
        hc.remove(s.runs / "copy")
        hc.remove(s.runs / "ours")
        rows.append(time_tool(s, "ours", ours_cmd(s, s.runs / "ours"), run))
    return rows


def run_mergekit(s: Setup, args) -> tuple[list[dict], str | None]:
    if args.skip_mergekit:
        return [], "mergekit skipped (--skip-mergekit)"
    if not args.mergekit_bin.is_file():
        return [], (f"mergekit skipped: {args.mergekit_bin} not found (python -m venv bench/.venv-mergekit && "
                    "bench/.venv-mergekit/bin/pip install torch==2.13.0 mergekit)")
    hc.remove(s.runs / "mergekit")
    try:
        return [time_tool(s, "mergekit", mergekit_cmd(s, s.runs / "mergekit", args.mergekit_bin), 1)], None
    except RuntimeError as e:
        return [], f"mergekit failed: {e}"


def add_ratios(rows: list[dict]) -> None:
    """x_copy = wall / best copy wall (target <= 1.5); mergekit_speedup = mergekit wall / wall (target >= 10)."""
    best = {t: min(r["wall_s"] for r in rows if r["tool"] == t) for t in {r["tool"] for r in rows}}
    for r in rows:
        r["x_copy"] = r["wall_s"] / best["copy"] if "copy" in best else None
        r["mergekit_speedup"] = best["mergekit"] / r["wall_s"] if "mergekit" in best else None


def targets(rows: list[dict]) -> dict:
    ours = [r for r in rows if r["tool"] == "ours"]
    best = min(ours, key=lambda r: r["wall_s"])
    speedup = best["mergekit_speedup"]
    return {"ours_within_1.5x_copy": best["x_copy"] <= 1.5,
            "ours_10x_faster_than_mergekit": None if speedup is None else speedup >= 10,
            "ours_peak_rss_under_1GB": max(r["peak_rss_mb"] for r in ours) < 1000}


def verify(s: Setup, have_mergekit: bool) -> dict:
    """Ours vs mergekit on a sample of tensors; both vs float64 on a few."""
    layers = mc.PRESETS[s.preset].layers
    outputs = {"ours": Checkpoint.from_folder(s.runs / "ours")}
    if have_mergekit:
        outputs["mergekit"] = Checkpoint.from_folder(s.runs / "mergekit")
    ref = check.Reference(s.inputs["base"], s.inputs["instruct"], s.inputs["lora"], ALPHA, BETA)
    result = {"vs_float64": {n: check.compare_reference(outputs, ref, n) for n in check.reference_names(layers)}}
    if have_mergekit:
        result["ours_vs_mergekit"] = {n: check.compare(outputs["ours"], outputs["mergekit"], ref.base, n)
                                      for n in check.sample_names(layers)}
    for ckpt in [*outputs.values(), ref]:
        ckpt.close()
    return result


def verdict(result: dict) -> dict:
    """Worst sampled distances: ours and mergekit vs float64, ours vs mergekit."""
    def worst(metric: str, label: str) -> float:
        return max(v[label][metric] for v in result["vs_float64"].values() if label in v)

    out = {"ours_max_ulp_input_vs_float64": worst("max_ulp_input", "ours"),
           "ours_rel_err_vs_float64": worst("rel_fro_err", "ours")}
    out["ours_within_1ulp_of_float64"] = out["ours_max_ulp_input_vs_float64"] <= 1.0
    if "ours_vs_mergekit" in result:
        out["mergekit_max_ulp_input_vs_float64"] = worst("max_ulp_input", "mergekit")
        out["mergekit_rel_err_vs_float64"] = worst("rel_fro_err", "mergekit")
        pairs = result["ours_vs_mergekit"].values()
        out["ours_vs_mergekit_max_ulp_input"] = max(v["max_ulp_input"] for v in pairs)
        out["ours_vs_mergekit_rel_err"] = max(v["rel_fro_err"] for v in pairs)
    return out


def check_table(result: dict) -> str:
    """One line per checked tensor and output: max ulp, share within 1 ulp, relative error."""
    rows = [{"tensor": n, "vs": f"{label} vs float64", **_short(d)}
            for n, v in result["vs_float64"].items() for label, d in v.items()]
    pairs = result.get("ours_vs_mergekit", {})
    rows += [{"tensor": n, "vs": "ours vs mergekit", **_short(d)} for n, d in pairs.items()]
    return hc.format_table(rows, ["tensor", "vs", "max_ulp", "max_ulp_input", "within_1ulp", "rel_err"])


def _short(d: dict) -> dict:
    return {"max_ulp": d["max_ulp"], "max_ulp_input": d["max_ulp_input"],
            "within_1ulp": f"{d['frac_within_ulp']['<=1']:.5f}", "rel_err": f"{d['rel_fro_err']:.2e}"}


COLUMNS = ["preset", "tool", "run", "cache", "role_cache", "inputs_cached", "wall_s", "peak_rss_mb", "user_s", "sys_s",
           "read_gb", "written_gb", "gb_per_s", "x_copy", "mergekit_speedup", "fs_in_gb", "fs_out_gb", "others_cpu_s"]


def out_name(s: Setup) -> str:
    """merge_<preset>[_warm][_first-run]: page cache cold (default) or warm, role cache warm or cold."""
    return f"merge_{s.preset}" + ("_warm" if s.cache == "warm" else "") + ("_first-run" if s.role_cache == "cold" else "")


def stamp(rows: list[dict], code: str) -> dict:
    """Add machine, torch and code version to every row; returns the machine description."""
    machine = hc.machine_info()
    for r in rows:
        r.update(machine, torch=torch.__version__, code=code)
    return machine


def report(s: Setup, args, rows: list[dict], extra: dict) -> None:
    paths = hc.write_rows(rows, extra, args.out_dir, out_name(s))
    print(hc.format_table(rows, COLUMNS))
    print(check_table(extra["checks"]))
    m = extra["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, {m['date']}; code {rows[0]['code']}")
    for key in ("notes", "targets", "verdict"):
        if extra.get(key):
            print(f"{key}: {extra[key]}")
    print("wrote " + ", ".join(str(p) for p in paths))


def verify_only(args) -> None:
    s = Setup.build(args.preset, args.workdir)
    checks = verify(s, (s.runs / "mergekit").is_dir())
    print(check_table(checks))
    print(f"verdict: {verdict(checks)}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.verify_only:
        return verify_only(args)
    check_disk(args.preset, args.workdir, not args.skip_mergekit)
    s = Setup.build(args.preset, args.workdir)
    s.cache, s.role_cache = args.cache, args.role_cache
    s.runs.mkdir(parents=True, exist_ok=True)
    if s.role_cache == "warm":
        hc.prime_role_cache(s.runs / "role-cache", s.inputs["base"], s.inputs["instruct"], s.inputs["lora"])
    code = hc.code_version(HERE.parent)  # taken before timing: other people may edit the tree meanwhile
    print(f"{s.preset}: reads {s.read_bytes / GB:.2f} GB, writes {s.write_bytes / GB:.2f} GB", flush=True)
    rows = run_copy_and_ours(s, args.repeat)
    mk_rows, note = run_mergekit(s, args)
    rows += mk_rows
    add_ratios(rows)
    extra = {"machine": stamp(rows, code), "notes": [note] if note else [], "targets": targets(rows)}
    hc.write_rows(rows, extra, args.out_dir, out_name(s))  # kept even if checking fails
    extra["checks"] = verify(s, bool(mk_rows))
    extra["verdict"] = verdict(extra["checks"])
    report(s, args, rows, extra)
    if not args.keep:
        hc.remove(s.runs)


if __name__ == "__main__":
    main()
