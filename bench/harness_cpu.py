"""Whole-process benchmarking on the CPU: wall time and peak RSS of a child command, rows to CSV/JSON.

Each command runs as a fresh child under GNU `/usr/bin/time -v` (Debian package `time`),
or, where that is missing, under a tiny Python wrapper that reports
`getrusage(RUSAGE_CHILDREN)` of its one child. Both give the same fields: wall_s,
peak_rss_mb (the child's maximum resident set), user_s, sys_s, fs_in_gb / fs_out_gb (bytes
that really went to or came from the block device, page-cache hits excluded).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GNU_TIME = "/usr/bin/time"
_RUSAGE_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.call(sys.argv[2:]); wall = time.perf_counter() - t\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "json.dump({'rc': rc, 'wall_s': wall, 'peak_rss_mb': r.ru_maxrss / 1024, 'user_s': r.ru_utime,\n"
    "           'sys_s': r.ru_stime, 'fs_in_gb': r.ru_inblock * 512 / 1e9, 'fs_out_gb': r.ru_oublock * 512 / 1e9},\n"
    "          open(sys.argv[1], 'w'))\n"
)


def _has_gnu_time() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    probe = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True, check=False)
    return "Maximum resident set size" in probe.stderr


def _parse_gnu_time(text: str) -> dict:
    def field(label: str) -> str:
        m = re.search(rf"{re.escape(label)}: (.+)", text)
        return m.group(1).strip() if m else "0"

    h_m_s = [float(x) for x in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(v * 60**i for i, v in enumerate(reversed(h_m_s)))
    return {"wall_s": wall, "peak_rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024,
            "user_s": float(field("User time (seconds)")), "sys_s": float(field("System time (seconds)")),
            "fs_in_gb": int(field("File system inputs")) * 512 / 1e9,
            "fs_out_gb": int(field("File system outputs")) * 512 / 1e9}


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def role_cache_env(mode: str, folder: Path) -> dict[str, str]:
    """A child's environment with stream_readapt's role-table cache (role_cache.py) in a known state.

    cold: a fresh, empty cache folder, as on a machine's first run (the child imports
    transformers and builds the model on meta, ~5 s on 2 cores); warm: `folder`, primed once
    by `prime_role_cache`, as on every later run with the same models.
    """
    if mode == "cold":
        folder = Path(tempfile.mkdtemp(prefix="role-cache-cold-", dir=folder.parent))
    return {**os.environ, "STREAM_READAPT_CACHE": str(folder)}


def prime_role_cache(folder: Path, base: Path, instruct: Path, lora: Path | None = None) -> None:
    """Plan a merge / extract of these inputs once, untimed, so their role tables are cached."""
    code = ("import sys\n"
            "from stream_readapt.io.checkpoint import Checkpoint\n"
            "from stream_readapt.deltas.sources import InstructDelta\n"
            "phi = Checkpoint.open(sys.argv[1])\n"
            "InstructDelta(Checkpoint.open(sys.argv[2])).plan(phi)\n"
            "if len(sys.argv) > 3:\n"
            "    from stream_readapt.terms.peft_adapter import PeftAdapter\n"
            "    from stream_readapt.arch.plan import bind_adapter\n"
            "    bind_adapter(PeftAdapter(sys.argv[3]), phi)\n")
    args = [str(base), str(instruct)] + ([str(lora)] if lora else [])
    subprocess.run([sys.executable, "-c", code, *args], check=True, env=role_cache_env("warm", folder))


def run_timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` as a fresh child; its stdout/stderr go to `log`. Raises on a non-zero exit.

    `others_cpu_s` is the CPU time other processes used meanwhile: a noise gauge on a
    shared machine (0 on an idle one; up to cores x wall when others saturate it).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report, open(log, "w") as out:
        busy = busy_cpu_seconds()
        start = time.perf_counter()
        if _has_gnu_time():
            rc = subprocess.call([GNU_TIME, "-v", "-o", report.name, *cmd], stdout=out, stderr=out, env=env)
            stats = _parse_gnu_time(Path(report.name).read_text())
        else:
            rc = subprocess.call([sys.executable, "-c", _RUSAGE_WRAPPER, report.name, *cmd], stdout=out, stderr=out,
                                 env=env)
            stats = json.loads(Path(report.name).read_text() or "{}")
        stats["wall_s"] = time.perf_counter() - start  # includes the wrapper's start-up: a few ms
        stats["others_cpu_s"] = max(0.0, busy_cpu_seconds() - busy - stats["user_s"] - stats["sys_s"])
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} exited with {rc}; see {log}")
    return stats


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return m.group(1).strip() if m else platform.machine()


def machine_info() -> dict:
    """CPU model, cores this process may use, RAM, date: what every row carries."""
    meminfo = Path("/proc/meminfo")
    mem_kb = re.search(r"MemTotal:\s+(\d+)", meminfo.read_text()) if meminfo.exists() else None
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
            "ram_gb": round(int(mem_kb.group(1)) / 2**20, 1) if mem_kb else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def code_version(repo: Path, package: str = "stream_readapt") -> str:
    """Git HEAD plus a hash of the package's sources as they are on disk (the tree may be dirty)."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    h = hashlib.sha256()
    for f in sorted((repo / package).rglob("*.py")):
        h.update(f.read_bytes())
    return f"{head.stdout.strip() or 'no-git'}+src:{h.hexdigest()[:10]}"


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(folder).glob(pattern))


def _input_files(folders: list[Path]) -> list[Path]:
    return [f for folder in folders for f in sorted(Path(folder).glob("*.safetensors"))]


def warm_page_cache(folders: list[Path]) -> None:
    """Flush dirty pages, then read the inputs (twice: once-read pages are the first evicted)."""
    os.sync()
    buf = bytearray(64 * 2**20)
    for _ in range(2):
        for f in _input_files(folders):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def evict_page_cache(folders: list[Path]) -> None:
    """Flush dirty pages, then drop these files (only these) from the page cache: a cold start."""
    os.sync()
    for f in _input_files(folders):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(folders: list[Path]) -> float | None:
    """Share of the inputs' bytes in the page cache (mincore through `fincore`), None if unknown."""
    files = _input_files(folders)
    if not files or not shutil.which("fincore"):
        return None
    probe = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, files)],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return None
    pairs = [line.split() for line in probe.stdout.splitlines() if line.strip()]
    return sum(int(r) for r, _ in pairs) / max(1, sum(int(z) for _, z in pairs))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def write_rows(rows: list[dict], extra: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """`stem`.json (rows + `extra`) and `stem`.csv (rows only) under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"rows": rows, **extra}, indent=2, default=str) + "\n")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Fixed-width text table; floats with 2 decimals, missing values as '-'."""
    def cell(v) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
