"""Shared benchmark harness: time a callable, describe the machine, append result rows to CSV/JSON.

Rows are long-format dicts: name, provider, shape, M, ranks, metric, value, device, version,
timestamp. GPU timings use `triton.testing.do_bench` (L2 flushed between runs; CUDA events
for calls over 100 ms); on the CPU a repeated wall clock stands in for it.
"""
from __future__ import annotations

import csv
import json
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

FIELDS = ["name", "provider", "shape", "M", "ranks", "metric", "value", "device", "version", "timestamp"]
QUANTILES = (0.2, 0.5, 0.8)


def time_ms(fn: Callable[[], object], *, cpu_reps: int = 5, slow_ms: float = 100.0) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds per call of `fn`.

    On a GPU: `triton.testing.do_bench`, unless one call takes over `slow_ms` (a full SVD of a
    70B-sized matrix): do_bench would run it at least 7 times, so `cpu_reps` - 1 calls timed
    with CUDA events stand in for it, after the first (warm-up) call.
    """
    if torch.cuda.is_available():
        import triton.testing

        first = _cuda_call_ms(fn)  # also compiles, creates handles, fills caches
        if first < slow_ms:
            return tuple(triton.testing.do_bench(fn, quantiles=list(QUANTILES)))
        times = [_cuda_call_ms(fn) for _ in range(max(1, cpu_reps - 1))]
    else:
        fn()  # warm-up (compiles, fills caches)
        times = []
        for _ in range(cpu_reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return tuple(float(torch.tensor(times).quantile(q)) for q in QUANTILES)


def _cuda_call_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def peak_memory_gb(fn: Callable[[], object]) -> float | None:
    """Extra GPU memory one call of `fn` allocates at its peak, in GB (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> str:
    """Versions of what the numbers depend on, as one string."""
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    if torch.version.cuda:
        parts.append(f"cuda {torch.version.cuda}")
    try:
        parts.insert(0, f"stream-readapt {metadata.version('stream-readapt')}")
    except metadata.PackageNotFoundError:  # benchmarking a checkout that is not installed
        pass
    return ", ".join(parts)


def make_row(name: str, provider: str, shape: str, M: int, ranks: str, metric: str, value: float,
             context: dict) -> dict:
    """One result row; `context` holds device, version and timestamp (see `run_context`)."""
    return {"name": name, "provider": provider, "shape": shape, "M": M, "ranks": ranks,
            "metric": metric, "value": value, **context}


def run_context() -> dict:
    return {"device": device_name(), "version": versions(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_rows(rows: list[dict], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Append rows to `<out_dir>/<stem>.csv` and `<stem>.json` (a JSON list), creating them if needed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    new_csv = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_csv:
            writer.writeheader()
        writer.writerows(rows)
    old = json.loads(json_path.read_text()) if json_path.exists() else []
    json_path.write_text(json.dumps(old + rows, indent=1) + "\n")
    return csv_path, json_path
