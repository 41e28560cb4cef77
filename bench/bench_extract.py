"""`stream-readapt extract` (full Δ) against a plain copy of the same bytes, cold and warm cache.

For one preset built by make_checkpoints.py: the floor reads base + instruct and writes a
base-size file set with fsync (copy_floor.py with no adapter); ours is
`stream-readapt extract BASE INSTRUCT -o OUT --device cpu`. Each is a fresh child under
`/usr/bin/time -v`, alternating, with the page cache evicted (cold) or filled (warm) first.
Rows (with CPU utilization = (user + sys) / wall) go to bench/out/extract_<preset>.json/.csv.

    python bench/bench_extract.py --preset 1b [--workdir /tmp/bench-data] [--repeat 2] [--role-cache cold|warm]

`--role-cache` (default warm): stream-readapt's cache of role tables primed once before the
runs (every later run on a machine), or empty before each run of ours (a machine's first).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import harness_cpu as hc
import make_checkpoints as mc

HERE = Path(__file__).resolve().parent


def commands(inputs: dict, out: Path, empty: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "stream_readapt.cli"]
    return {"copy": [sys.executable, str(HERE / "copy_floor.py"), str(inputs["base"]), str(inputs["instruct"]),
                     str(empty), "-o", str(out)],
            "ours": cli + ["extract", str(inputs["base"]), str(inputs["instruct"]), "-o", str(out),
                           "--device", "cpu", "--quiet"]}


def one_run(inputs: dict, tool: str, cmd: list[str], cache: str, out: Path, run: int, role_cache: str) -> dict:
    folders = [inputs["base"], inputs["instruct"]]
    (hc.evict_page_cache if cache == "cold" else hc.warm_page_cache)(folders)
    env = hc.role_cache_env(role_cache, out.parent / "role-cache") if tool == "ours" else None
    stats = hc.run_timed(cmd, out.parent / f"{tool}-{cache}-{run}.log", env=env)
    hc.remove(out)
    cpu = (stats["user_s"] + stats["sys_s"]) / stats["wall_s"]
    print(f"  {tool:4s} {cache} run {run}: {stats['wall_s']:.1f} s, CPU {100 * cpu:.0f}%, "
          f"peak RSS {stats['peak_rss_mb']:.0f} MB, others used {stats['others_cpu_s']:.0f} CPU-s", flush=True)
    return {"tool": tool, "cache": cache, "role_cache": role_cache if tool == "ours" else "", "run": run,
            "cpu_util": round(cpu, 3), **stats}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(mc.PRESETS), required=True)
    p.add_argument("--workdir", type=Path, default=Path(mc.DEFAULT_WORKDIR))
    p.add_argument("--out-dir", type=Path, default=HERE / "out")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--role-cache", choices=["cold", "warm"], default="warm")
    args = p.parse_args(argv)
    inputs = mc.build(args.preset, args.workdir)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out, empty = Path(tmp) / "out", Path(tmp) / "empty"
        empty.mkdir()
        if args.role_cache == "warm":
            hc.prime_role_cache(Path(tmp) / "role-cache", inputs["base"], inputs["instruct"])
        for cache in ("cold", "warm"):
            for run in range(1, args.repeat + 1):
                for tool, cmd in commands(inputs, out, empty).items():
                    rows.append(one_run(inputs, tool, cmd, cache, out, run, args.role_cache))
    for r in rows:
        floor = min(x["wall_s"] for x in rows if x["tool"] == "copy" and x["cache"] == r["cache"])
        r.update(preset=args.preset, x_copy=round(r["wall_s"] / floor, 2))
    print(hc.format_table(rows, ["preset", "tool", "cache", "role_cache", "run", "wall_s", "x_copy", "cpu_util", "user_s",
                                 "sys_s", "peak_rss_mb", "others_cpu_s"]))
    name = f"extract_{args.preset}" + ("_first-run" if args.role_cache == "cold" else "")
    print("wrote", *hc.write_rows(rows, {"machine": hc.machine_info()}, args.out_dir, name))


if __name__ == "__main__":
    main()
