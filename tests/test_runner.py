"""The execution seam: plan_shards' work units and LocalRunner, checked without extract or merge."""

from __future__ import annotations

import pytest
import torch

from stream_readapt.arch.plan import TensorPlan
from stream_readapt.engine.options import RunOptions
from stream_readapt.engine.runner import LocalRunner, ShardOutput, plan_shards
from stream_readapt.io.checkpoint import Checkpoint

SHAPES = {"a.weight": (7, 5), "b.weight": (13, 3), "c.bias": (11,), "d.weight": (3, 17), "e.weight": (9, 9)}
LIKE = {"a.weight": "s1", "b.weight": "s2", "c.bias": "s1", "d.weight": "s2"}  # e: not in the base layout


def _pairs() -> list[TensorPlan]:
    return [TensorPlan(n, n, s, s[0], torch.float32) for n, s in SHAPES.items()]


def _bytes(shape) -> int:
    return 4 * int(torch.tensor(shape).prod())


@pytest.mark.parametrize("max_shard", [None, 300, 10**6])
def test_units_cover_every_tensor_once_in_write_order(max_shard):
    run = RunOptions.resolve(device="cpu", max_shard_size=max_shard)
    plan = plan_shards(_pairs(), lambda p: torch.float32, run, LIKE)
    names = [p.name for p in plan.order]
    assert sorted(names) == sorted(SHAPES) and len(names) == len(set(names))
    assert plan.groups == [[p.name for p in u.tensors] for u in plan.units]
    assert [u.index for u in plan.units] == list(range(len(plan.units)))
    assert plan.nbytes == sum(_bytes(s) for s in SHAPES.values())
    assert all(u.nbytes == sum(_bytes(p.shape) for p in u.tensors) for u in plan.units)
    if max_shard is None:  # the base's layout; a tensor it lacks joins the one planned before it
        assert plan.groups == [["a.weight", "c.bias"], ["b.weight", "d.weight", "e.weight"]]
    elif max_shard == 300:
        assert len(plan.units) > 2 and all(u.nbytes <= 300 or len(u.tensors) == 1 for u in plan.units)


class RowIndex:
    """A StreamWork whose block holds each row's index plus the tensor's number of columns."""

    state: dict

    def __init__(self):
        self.state, self.blocks, self.jobs = {}, None, []

    def bind(self, blocks):
        self.blocks = blocks

    def reads_of(self, job):
        return []

    def compute(self, job):
        self.jobs.append((job.pair.name, job.start, job.stop))
        cols = job.pair.shape[1] if len(job.pair.shape) > 1 else 1
        rows = torch.arange(job.start, job.stop, dtype=torch.float32)[:, None] + cols
        return rows.expand(-1, cols).reshape((job.stop - job.start, *job.pair.shape[1:])).clone()


def test_local_runner_streams_every_block_into_the_planned_shards(tmp_path):
    run = RunOptions.resolve(device="cpu", max_shard_size=300, block_bytes=64)  # several blocks per tensor
    plan = plan_shards(_pairs(), lambda p: torch.float32, run, LIKE)
    work = RowIndex()
    LocalRunner().run(plan, work, ShardOutput(tmp_path), run, "test")
    assert work.blocks is not None and len(work.jobs) > len(SHAPES)
    with Checkpoint.from_folder(tmp_path) as ckpt:
        assert len({ckpt.weight_map[n] for n in SHAPES}) == len(plan.units)
        for name, shape in SHAPES.items():
            cols = shape[1] if len(shape) > 1 else 1
            want = (torch.arange(shape[0], dtype=torch.float32)[:, None] + cols).expand(-1, cols).reshape(shape)
            assert torch.equal(ckpt.read(name), want)


def test_local_runner_writes_each_units_own_result_in_plan_order():
    """Unit passes (LoRE): every unit computed once, and its own result written, in plan order,
    whatever order or interleaving the computing could have had."""
    computed, written = [], []

    class Work:
        def cost(self, unit):
            return unit

        def compute(self, unit):
            computed.append(unit)
            return None if unit == 2 else unit * 10

        def write(self, unit, result):
            written.append((unit, result))

    LocalRunner().run_units([5, 2, 7], Work(), RunOptions.resolve(device="cpu", quiet=True), "units")
    assert computed == [5, 2, 7]
    assert written == [(5, 50), (2, None), (7, 70)]
