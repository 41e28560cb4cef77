"""The I/O floor of a merge: read base + instruct + adapter once, write base-size bytes once.

Each base shard is copied to OUT in large chunks while the instruct shard of the same
index is read alongside (its bytes are dropped), then the adapter files are read; every
output file is fsync'ed, as the project's writer does. No parsing, no arithmetic.

    python bench/copy_floor.py BASE INSTRUCT ADAPTER -o OUT
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

CHUNK = 64 * 2**20


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_chunk(fh, buf: bytearray) -> memoryview:
    n = fh.readinto(buf)
    return memoryview(buf)[:n]


def copy_with_companion(src: Path, companion: Path | None, dst: Path, bufs: tuple[bytearray, bytearray]) -> int:
    """Copy `src` to `dst` while reading `companion` in step; returns bytes read."""
    total = 0
    with contextlib.ExitStack() as stack:
        fin = stack.enter_context(open(src, "rb", buffering=0))
        fout = stack.enter_context(open(dst, "wb", buffering=0))
        side = stack.enter_context(open(companion, "rb", buffering=0)) if companion else None
        while chunk := read_chunk(fin, bufs[0]):
            fout.write(chunk)
            total += len(chunk) + (len(read_chunk(side, bufs[1])) if side else 0)
        total += drain(side, bufs[1]) if side else 0
        os.fsync(fout.fileno())
    return total


def drain(fh, buf: bytearray) -> int:
    total = 0
    while n := fh.readinto(buf):
        total += n
    return total


def copy_floor(base: Path, instruct: Path, adapter: Path, out: Path) -> int:
    """Returns the bytes read; writes one file per base shard into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    bufs = (bytearray(CHUNK), bytearray(CHUNK))
    companions = shard_files(instruct)
    total = 0
    for i, src in enumerate(shard_files(base)):
        companion = companions[i] if i < len(companions) else None
        total += copy_with_companion(src, companion, out / src.name, bufs)
    for extra in companions[len(shard_files(base)):] + shard_files(adapter):
        with open(extra, "rb", buffering=0) as fh:
            total += drain(fh, bufs[1])
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path)
    p.add_argument("instruct", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    copy_floor(args.base, args.instruct, args.adapter, args.output)


if __name__ == "__main__":
    main()
