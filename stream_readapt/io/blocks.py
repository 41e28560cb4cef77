"""Row-block buffers that are reused and read ahead.

A streaming pass is a loop over row blocks: read raw rows, convert to float32,
compute, convert back, write. Fresh buffers for every block cost page faults
(as much kernel time as the copy itself), and reading in the computing thread
leaves a core idle. `BlockBuffers` keeps a few buffers per slot and reads the
next block's rows on a background thread while the current one is computed
(`os.preadv` releases the GIL); `BackgroundWriter` (writer.py) does the same
for the output.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..arch.plan import TensorPlan
from ..engine.streaming import check_finite, row_blocks
from .ownership import check_free_space
from .writer import BackgroundWriter, CheckpointWriter

RAW_BUFFERS = 3  # per slot: one being converted, one read ahead, one spare


class BlockBuffers:
    """Reusable per-slot buffers, with read-ahead of the next block.

    Example:
        >>> with BlockBuffers(device) as blocks:
        ...     blocks.prefetch([(ckpt, "lm_head.weight", 1024, 2048, "phi")])
        ...     phi = blocks.read_f32(ckpt, "lm_head.weight", 0, 1024, slot="phi")
    """

    def __init__(self, device: torch.device, *, read_ahead: bool = True):
        self.device = device
        self._store: dict[tuple, torch.Tensor] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead") if read_ahead else None
        self._pending: dict[tuple, tuple[int, Future]] = {}  # read key -> (raw buffer id, read)
        self._busy: dict[str, set[int]] = {}

    def get(self, slot: str, shape, dtype: torch.dtype, device=None) -> torch.Tensor:
        """A buffer of `shape` for `slot` (grown when needed, else reused)."""
        device = torch.device(device or "cpu")
        numel = math.prod(shape)
        key = (slot, dtype, str(device))
        buf = self._store.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._store[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def prefetch(self, reads) -> None:
        """Start reading (ckpt, name, start, stop, slot) blocks in the background."""
        if self._pool is None:
            return
        for ckpt, name, start, stop, slot in reads:
            key = (id(ckpt), name, start, stop, slot)
            if key not in self._pending:
                buf_id, raw = self._raw_buffer(ckpt, name, start, stop, slot)
                self._pending[key] = (buf_id, self._pool.submit(ckpt.read_rows, name, start, stop, out=raw))

    def read_f32(self, ckpt, name: str, start: int, stop: int, slot: str) -> torch.Tensor:
        """Rows [start, stop) of `name` as float32 on the device (valid until this slot's next read)."""
        pending = self._pending.pop((id(ckpt), name, start, stop, slot), None)
        if pending is not None:
            buf_id, raw = pending[0], pending[1].result()
        else:
            buf_id, raw = self._raw_buffer(ckpt, name, start, stop, slot)
            raw = ckpt.read_rows(name, start, stop, out=raw)
        try:
            if self.device.type != "cpu":
                raw = raw.to(self.device)
            return self.get(slot, tuple(raw.shape), torch.float32, self.device).copy_(raw)
        finally:
            self._busy[slot].discard(buf_id)

    def to_cpu(self, block: torch.Tensor, dtype: torch.dtype, slot: str = "out") -> torch.Tensor:
        """`block` cast to `dtype` on the CPU, ready to write (valid until this slot's next use)."""
        if block.device.type != "cpu":
            return block.to(dtype).cpu()
        return self.get(slot, tuple(block.shape), dtype).copy_(block)

    def _raw_buffer(self, ckpt, name, start, stop, slot) -> tuple[int, torch.Tensor]:
        info = ckpt.info(name)
        rows = (min(stop, info.shape[0]) - start,) + tuple(info.shape[1:]) if info.shape else ()
        busy = self._busy.setdefault(slot, set())
        buf_id = next(i for i in range(RAW_BUFFERS) if i not in busy)
        busy.add(buf_id)
        return buf_id, self.get(f"{slot}.raw{buf_id}", rows, info.dtype)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> "BlockBuffers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Job:
    """One row block of one output tensor."""

    pair: TensorPlan
    start: int
    stop: int
    last: bool  # the tensor's last block


def block_jobs(order: list[TensorPlan], block_bytes: int, align=None) -> list[Job]:
    """Row blocks of each tensor; `align(pair)`: blocks start on multiples of that many rows."""
    jobs = []
    for pair in order:
        if math.prod(pair.shape) == 0:  # a legal empty tensor (zero rows or columns): written, never read
            jobs.append(Job(pair, 0, 0, True))
            continue
        rows = pair.shape[0] if pair.shape else 1
        step = align(pair) if align else 1
        spans = list(row_blocks(rows, math.prod(pair.shape[1:]), block_bytes, split_at=pair.base_rows, align=step))
        jobs += [Job(pair, a, b, i == len(spans) - 1) for i, (a, b) in enumerate(spans)]
    return jobs


def stream_pass(writer: CheckpointWriter, order: list[TensorPlan], *, dtype_of, blocks: BlockBuffers,
                reads_of, compute, block_bytes: int, bar, state: dict | None = None,
                requantize: dict | None = None) -> None:
    """The loop every streaming pass shares: read ahead, compute, check, write behind.

    `reads_of(job)` lists the (ckpt, name, start, stop, slot) reads `compute(job)` will
    make through `blocks`, so they can start while the previous block is computed;
    `compute(job)` returns the block as float32 (or float64) on the device. `state` (tensor
    name -> JSON values the caller fills while computing) is saved with each finished shard,
    and restored for the shards a resumed run skips. `requantize` (tensor name ->
    `requantize.Requantizer`) writes those tensors in their quantized format, each followed by
    its scale tensor (planned right after it, and not computed on its own).
    """
    requantize = requantize or {}
    scales = {r.scale_name for r in requantize.values()}
    if state is not None:
        writer.track_state(state)
    order = [p for p in order if p.name not in writer.done]  # finished by the run this one resumes
    check_free_space(writer.folder, sum(math.prod(p.shape) * dtype_of(p).itemsize for p in order))
    order = [p for p in order if p.name not in scales]  # written by their weight's requantizer
    jobs = block_jobs(order, block_bytes, lambda p: requantize[p.name].rows_per_block if p.name in requantize else 1)
    out = BackgroundWriter(writer)
    threads = torch.get_num_threads()
    if blocks.device.type == "cpu" and threads > 1:
        # Leave a core to the read-ahead and write-behind threads: measured on 2 cores,
        # 1 compute thread finishes a 1B merge ~1.4x sooner than 2 that fight the I/O.
        torch.set_num_threads(threads - 1)
    try:
        for i, job in enumerate(jobs):
            if i + 1 < len(jobs):
                blocks.prefetch(reads_of(jobs[i + 1]))
            dtype = dtype_of(job.pair)
            if job.start == 0:
                out.begin(job.pair.name, dtype, job.pair.shape)
                scale_rows = []
            if job.start == job.stop:  # an empty tensor: nothing to compute or write
                out.end()
                continue
            req = requantize.get(job.pair.name)
            if req is not None:
                rows = compute(job)
                check_finite(rows, job.pair.name)
                values, scale, err, norm = req.encode(rows)
                out.write(values.cpu())
                scale_rows.append(scale.cpu())
                if state is not None:  # Σ error², Σ Ω² so far (JSON: the journal saves them)
                    sums = state[job.pair.name].setdefault("requantized", [0.0, 0.0])
                    sums[0], sums[1] = sums[0] + err, sums[1] + norm
            else:
                block = blocks.to_cpu(compute(job), dtype, slot=f"out{i % 2}")  # two buffers: one is being written
                check_finite(block, job.pair.name)  # as written: a float16 cast can overflow to Inf
                out.write(block)
            if job.last:
                out.end()
                if req is not None:
                    out.begin(req.scale_name, torch.float32, req.scale_shape)
                    out.write(torch.cat(scale_rows))
                    out.end()
                bar.update(math.prod(job.pair.shape) * dtype.itemsize)
        out.finalize()
    except BaseException:
        out.abort()
        raise
    finally:
        torch.set_num_threads(threads)
