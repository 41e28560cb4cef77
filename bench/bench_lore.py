"""Benchmark LoRE-Adapter extraction (`stream-readapt extract --rank/--energy`) against mergekit.

For one preset (see make_checkpoints.py), side by side in one run, each as a fresh child
process on the CPU (wall time and peak RSS from `/usr/bin/time -v`, harness_cpu.run_timed):
  mergekit  rank64     mergekit-extract-lora --max-rank 64: Δ = Θ − Φ in the inputs' dtype,
                       then a full float32 `torch.linalg.svd` of every matrix, truncated to 64;
  ours      rank64     stream-readapt extract BASE INSTRUCT --rank 64: float32 Δ from row
                       blocks, randomized SVD with a 72-column basis (lowrank.randomized_svd);
  ours      energy0.5  the same with --energy 0.5 (the paper's τ): each matrix gets the fewest
                       directions explaining half of ‖Δ‖_F², so ranks differ per module.
Both tools write a PEFT LoRA folder (embeddings, lm_head and norms as full tensors), in bf16.

Accuracy, after timing, on a sample of linear modules (all seven projection types, spread
over the layers): Δ = Θ − Φ in float64 and its singular values from a full float64 SVD
(`torch.linalg.svdvals`); by Eckart–Young the best rank-k error is
‖σ_{>k}‖ / ‖Δ‖_F. Each tool's adapter is read back with PEFT's own scaling
(`PeftAdapter`: lora_alpha / r, honouring rank_pattern / alpha_pattern), and its error
‖Δ − s·B·A‖_F / ‖Δ‖_F is divided by the optimum *at that module's rank*, so a ratio of 1.00
is optimal for whatever rank the tool chose. Rank statistics come from the adapters' factor
shapes; for ours at τ = 0.5 also per module type from the manifest.

    python bench/bench_lore.py --preset 1b [--workdir /tmp/bench-data] [--sample 12]
        [--skip-mergekit] [--max-load 1.5] [--profile] [--keep]

Targets: ours at rank 64 ≥ 20× faster than mergekit, mean error ratio ≤ 1.02, peak RSS < 1 GB.
Rows go to bench/out/lore_<preset>.json / .csv. `--profile` adds a cProfile of ours at rank 64
(in this process, after the timed runs), top functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import shutil
import statistics
import sys
import time
from pathlib import Path

import harness_cpu as hc
import make_checkpoints as mc
import torch
from bench_merge import stream_readapt_cmd

from stream_readapt.io.checkpoint import Checkpoint
from stream_readapt.lowrank.lore import format_module_summary, summarize_modules
from stream_readapt.engine.manifest import read_manifest
from stream_readapt.terms.peft_adapter import PeftAdapter

HERE = Path(__file__).resolve().parent
DEFAULT_MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-extract-lora"
RANK, ENERGY = 64, 0.5
TARGET_SPEEDUP, TARGET_ERR_RATIO, TARGET_RSS_MB = 20.0, 1.02, 1000.0
SHORT_NAMES = tuple(mc.LlamaShape(1, 1, 1, 1, 1, 1).linear_shapes())  # q, k, v, o, gate, up, down
GB = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(mc.PRESETS), required=True, help="model shape (make_checkpoints.py)")
    p.add_argument("--workdir", type=Path, default=Path(mc.DEFAULT_WORKDIR), help="inputs and outputs")
    p.add_argument("--out-dir", type=Path, default=HERE / "out", help="where lore_<preset>.json/.csv go")
    p.add_argument("--sample", type=int, default=12, help="modules checked against the exact SVD (default 12)")
    p.add_argument("--mergekit-bin", type=Path, default=DEFAULT_MERGEKIT, help="mergekit-extract-lora to compare with")
    p.add_argument("--skip-mergekit", action="store_true", help="time only ours")
    p.add_argument("--max-load", type=float, help="before each timed run, wait (up to 10 min) for loadavg-1min below this")
    p.add_argument("--profile", action="store_true", help="also cProfile ours at rank 64 and print where time goes")
    p.add_argument("--keep", action="store_true", help="keep the adapters (default: removed after checking)")
    return p.parse_args(argv)


# -- commands ------------------------------------------------------------------------------

def extract_args(inputs: dict, out: Path, mode: list[str]) -> list[str]:
    return ["extract", str(inputs["base"]), str(inputs["instruct"]), "-o", str(out), *mode, "--device", "cpu", "--quiet"]


def ours_cmd(inputs: dict, out: Path, mode: list[str]) -> list[str]:
    return [*stream_readapt_cmd(), *extract_args(inputs, out, mode)]


def mergekit_cmd(inputs: dict, out: Path, mergekit_bin: Path) -> list[str]:
    return [str(mergekit_bin), "--model", str(inputs["instruct"]), "--base-model", str(inputs["base"]),
            "--out-path", str(out), "--max-rank", str(RANK), "--device", "cpu", "--quiet"]


def cases(inputs: dict, runs: Path, args) -> list[tuple[str, str, Path, list[str]]]:
    """(tool, mode, output folder, command) of every timed run, mergekit first."""
    out = [("ours", f"rank{RANK}", runs / "ours-rank", ours_cmd(inputs, runs / "ours-rank", ["--rank", str(RANK)])),
           ("ours", f"energy{ENERGY}", runs / "ours-energy",
            ours_cmd(inputs, runs / "ours-energy", ["--energy", str(ENERGY)]))]
    if not args.skip_mergekit and args.mergekit_bin.is_file():
        out.insert(0, ("mergekit", f"rank{RANK}", runs / "mergekit", mergekit_cmd(inputs, runs / "mergekit", args.mergekit_bin)))
    return out


# -- timing --------------------------------------------------------------------------------

def wait_for_quiet(max_load: float | None, timeout_s: float = 600.0) -> None:
    """Poll the 1-minute load average until it drops below `max_load` (or give up after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while max_load is not None and os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"  load {os.getloadavg()[0]:.2f} > {max_load}: waiting", flush=True)
        time.sleep(30)


def time_case(preset: str, inputs: dict, case, log_dir: Path, max_load: float | None) -> dict:
    """One timed run from a warm page cache; a result row (the output stays for checking)."""
    tool, mode, out, cmd = case
    hc.remove(out)
    wait_for_quiet(max_load)  # first: a long wait lets other jobs evict the inputs again
    hc.warm_page_cache([inputs["base"], inputs["instruct"]])
    load, code = os.getloadavg()[0], hc.code_version(HERE.parent)  # per run: others edit the tree meanwhile
    stats = hc.run_timed(cmd, log_dir / f"{tool}-{mode}.log")
    print(f"  {tool:8s} {mode:10s}: {stats['wall_s']:.1f} s, peak RSS {stats['peak_rss_mb']:.0f} MB, "
          f"load {load:.2f} at start, other processes used {stats['others_cpu_s']:.0f} CPU-s meanwhile", flush=True)
    return {"preset": preset, "tool": tool, "mode": mode, **stats, "cpu_s": stats["user_s"] + stats["sys_s"],
            "load1_start": load, "code": code,
            "adapter_mb": hc.folder_bytes(out) / 1e6}


# -- accuracy ------------------------------------------------------------------------------

def sample_modules(preset: str, n: int) -> list[str]:
    """n linear modules cycling through the projection types, layers spread from first to last."""
    layers = mc.PRESETS[preset].layers
    picks = [(round(i * (layers - 1) / max(1, n - 1)), SHORT_NAMES[i % len(SHORT_NAMES)]) for i in range(n)]
    return [mc.module_path(layer, short) for layer, short in picks]


def exact_delta(phi: Checkpoint, theta: Checkpoint, module: str) -> torch.Tensor:
    name = f"{module}.weight"
    return theta.read(name).double() - phi.read(name).double()


def optimal_errors(delta: torch.Tensor) -> torch.Tensor:
    """opt[k] = best relative Frobenius error at rank k (Eckart–Young), k = 0 .. min(m, n)."""
    sq = torch.linalg.svdvals(delta).square()
    tail = sq.flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{i≥k} σ_i²
    return torch.cat([tail, tail.new_zeros(1)]).div(sq.sum()).sqrt()


def adapter_error(adapter: PeftAdapter, module: str, delta: torch.Tensor) -> tuple[int, float]:
    """(rank, ‖Δ − s·B·A‖_F / ‖Δ‖_F) of one module of a PEFT adapter, in float64."""
    mod = adapter.modules[module]
    name = f"{module}.weight"
    approx = adapter.delta_rows(name, delta.float(), 0, delta.shape[0]).double()
    rank = adapter.ckpt.info(mod.A).shape[0]
    return rank, float(torch.linalg.matrix_norm(delta - approx) / torch.linalg.matrix_norm(delta))


def check_accuracy(inputs: dict, outputs: dict[str, Path], modules: list[str]) -> dict:
    """Per module and output label: rank, error, optimum at that rank, and their ratio."""
    adapters = {label: PeftAdapter(folder) for label, folder in outputs.items()}
    result = {}
    with Checkpoint.from_folder(inputs["base"]) as phi, Checkpoint.from_folder(inputs["instruct"]) as theta:
        for module in modules:
            delta = exact_delta(phi, theta, module)
            opt = optimal_errors(delta)
            result[module] = {}
            for label, adapter in adapters.items():
                rank, err = adapter_error(adapter, module, delta)
                best = float(opt[rank])  # 0 at full rank: then only storage rounding is left, no ratio
                result[module][label] = {"rank": rank, "err": err, "opt": best,
                                         "ratio": err / best if best > 1e-9 else None}
            print(f"  checked {module} {tuple(delta.shape)}", flush=True)
    for adapter in adapters.values():
        adapter.close()
    return result


def accuracy_columns(result: dict, label: str) -> dict:
    per = [v[label] for v in result.values()]
    ratios = [p["ratio"] for p in per if p["ratio"] is not None]
    return {"mean_err_ratio": statistics.fmean(ratios) if ratios else None,
            "max_err_ratio": max(ratios, default=None), "modules_checked": len(per), "modules_with_ratio": len(ratios),
            "mean_rel_err": statistics.fmean(p["err"] for p in per),
            "mean_opt_err": statistics.fmean(p["opt"] for p in per)}


def rank_columns(folder: Path) -> dict:
    """Rank min / mean / max over every LoRA module, from the factor shapes in the file."""
    adapter = PeftAdapter(folder)
    ranks = [adapter.ckpt.info(m.A).shape[0] for m in adapter.modules.values()]
    adapter.close()
    return {"lora_modules": len(ranks), "rank_min": min(ranks), "rank_mean": statistics.fmean(ranks),
            "rank_max": max(ranks)}


# -- profile -------------------------------------------------------------------------------

def profile_ours(inputs: dict, runs: Path, top: int = 25) -> str:
    """cProfile of the CLI at rank 64 in a fresh child (the code as it is on disk now): top
    functions by cumulative and by own time."""
    out, prof = runs / "ours-profile", runs / "ours-rank64.prof"
    hc.remove(out)
    hc.warm_page_cache([inputs["base"], inputs["instruct"]])
    hc.run_timed([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "stream_readapt.cli",
                  *extract_args(inputs, out, ["--rank", str(RANK)])], runs / "ours-profile.log")
    hc.remove(out)
    text = io.StringIO()
    stats = pstats.Stats(str(prof), stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


# -- report --------------------------------------------------------------------------------

def targets(rows: list[dict]) -> dict:
    by = {(r["tool"], r["mode"]): r for r in rows}
    ours = by[("ours", f"rank{RANK}")]
    mk = by.get(("mergekit", f"rank{RANK}"))
    speedup = mk["wall_s"] / ours["wall_s"] if mk else None
    # CPU seconds are the steadier yardstick when other jobs share the cores
    return {"speedup_vs_mergekit_rank64": speedup,
            "cpu_time_speedup_vs_mergekit_rank64": mk["cpu_s"] / ours["cpu_s"] if mk else None,
            f"ours_{TARGET_SPEEDUP:.0f}x_faster_than_mergekit": None if speedup is None else speedup >= TARGET_SPEEDUP,
            f"ours_rank64_mean_err_ratio_le_{TARGET_ERR_RATIO}": (None if ours["mean_err_ratio"] is None
                                                                  else ours["mean_err_ratio"] <= TARGET_ERR_RATIO),
            "ours_peak_rss_under_1GB": all(r["peak_rss_mb"] < TARGET_RSS_MB for r in rows if r["tool"] == "ours")}


def accuracy_table(result: dict) -> str:
    rows = [{"module": m, "tool": label, **v} for m, per in result.items() for label, v in per.items()]
    for r in rows:
        r.update(err=f"{r['err']:.5f}", opt=f"{r['opt']:.5f}", ratio=None if r["ratio"] is None else f"{r['ratio']:.4f}")
    return hc.format_table(rows, ["module", "tool", "rank", "err", "opt", "ratio"])


COLUMNS = ["preset", "tool", "mode", "wall_s", "peak_rss_mb", "cpu_s", "load1_start", "others_cpu_s",
           "adapter_mb", "rank_min", "rank_mean", "rank_max", "mean_rel_err", "mean_opt_err", "mean_err_ratio",
           "max_err_ratio"]


def _display(row: dict) -> dict:
    """Errors and ratios need more than format_table's two decimals."""
    fine = {k: f"{row[k]:.4f}" for k in ("mean_rel_err", "mean_opt_err", "mean_err_ratio", "max_err_ratio")
            if row.get(k) is not None}
    return {**row, **fine}


def report(preset: str, args, rows: list[dict], extra: dict) -> None:
    machine = hc.machine_info()
    for r in rows:
        r.update(machine, torch=torch.__version__)
    paths = hc.write_rows(rows, {"machine": machine, **extra}, args.out_dir, f"lore_{preset}")
    print(hc.format_table([_display(r) for r in rows], COLUMNS))
    print("\nper-module accuracy (err = ‖Δ − s·B·A‖/‖Δ‖, opt = Eckart–Young at the same rank):")
    print(accuracy_table(extra["accuracy"]))
    if extra.get("energy_ranks"):
        print(f"\nours at τ = {ENERGY}, per module type (manifest):")
        print("\n".join(format_module_summary(extra["energy_ranks"])))
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GiB RAM, {machine['date']}; "
          f"torch {torch.__version__}; code per run: {sorted({r['code'] for r in rows})}")
    for key in ("notes", "targets"):
        if extra.get(key):
            print(f"{key}: {extra[key]}")
    print("wrote " + ", ".join(str(p) for p in paths))


def check_disk(preset: str, workdir: Path) -> None:
    sizes = mc.preset_bytes(preset)
    built = (workdir / preset / "complete.json").is_file()
    need = (0 if built else 2 * sizes["model"] + sizes["adapter"]) + 2 * GB  # three adapters + margin
    probe = next(p for p in [workdir, *workdir.parents] if p.exists())
    if shutil.disk_usage(probe).free < need:
        sys.exit(f"bench_lore: need ~{need / GB:.1f} GB free under {workdir} (pass --workdir elsewhere)")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_disk(args.preset, args.workdir)
    inputs = mc.build(args.preset, args.workdir)
    runs = args.workdir / args.preset / "lore-runs"
    runs.mkdir(parents=True, exist_ok=True)
    todo = cases(inputs, runs, args)
    notes = [] if any(t == "mergekit" for t, *_ in todo) else [f"mergekit skipped ({args.mergekit_bin})"]
    rows = [time_case(args.preset, inputs, case, runs, args.max_load) for case in todo]
    outputs = {f"{tool}-{mode}": out for tool, mode, out, _ in todo}
    accuracy = check_accuracy(inputs, outputs, sample_modules(args.preset, args.sample))
    for row, label in zip(rows, outputs):
        row.update(rank_columns(outputs[label]), **accuracy_columns(accuracy, label))
    energy = read_manifest(runs / "ours-energy") or {}
    extra = {"notes": notes, "targets": targets(rows), "accuracy": accuracy,
             "energy_ranks": summarize_modules(energy.get("modules") or {})}
    if args.profile:
        extra["profile"] = profile_ours(inputs, runs)
    report(args.preset, args, rows, extra)
    if args.profile:
        print(extra["profile"])
    if not args.keep:
        hc.remove(runs)


if __name__ == "__main__":
    main()
