from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from subfit_fx.branches import count_block_params
from subfit_fx.calibrate import prepare
from subfit_fx.errors import CalibrationError, InputError
from subfit_fx.methods.base import PolicyContext
from subfit_fx.methods.subfit import subfit
from subfit_fx.pipelines import (
    AllReduce,
    LayerByLayer,
    SessionFactory,
    all_reduce_stats,
    all_reduce_sum,
    check_same_recipe,
    shard_batches,
)
from subfit_fx.recipe import Recipe
from tests.conftest import captured
from tests.pipelines.conftest import batches, flat

WORLD = 2
OPTIONS = {"sequential": True}  # also exercises sharded dense-target recording + targeted calibration


def test_shards_partition_the_batches():
    items = list(range(7))
    shards = [shard_batches(items, rank, 3) for rank in range(3)]
    assert sorted(i for s in shards for i in s) == items and [len(s) for s in shards] == [3, 2, 2]
    assert shard_batches(items[:1], 1, 2) == []  # a rank may get nothing
    with pytest.raises(InputError, match="rank 2 is not in a world of 2"):
        shard_batches(items, 2, 2)


def test_without_a_process_group_everything_is_local():
    _, ep = captured("llama", 8)
    data = batches()
    dense = prepare(ep, progress=False).calibrate(data, desc=None)
    session = SessionFactory(distributed=True)(ep, progress=False)
    assert (session.reducer.rank, session.reducer.world) == (0, 1)
    got = session.calibrate(data, desc=None)
    assert all(torch.equal(got[label].gram["normalized"], s.gram["normalized"]) for label, s in dense.items())
    assert all_reduce_stats(got) is got and all_reduce_sum([2.0]) == [2.0]
    check_same_recipe(Recipe("subfit", [], []))
    assert not SessionFactory().is_distributed()  # no process group
    both = SessionFactory("sequential", distributed=True)(ep, progress=False)
    assert isinstance(both.pipeline, LayerByLayer) and isinstance(both.reducer, AllReduce)
    with pytest.raises(InputError, match="unknown pipeline"):
        SessionFactory("pipelined")


def _rank(rank: int, init: str, ep: torch.export.ExportedProgram, out: str, data: list) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=90))
    try:
        session = SessionFactory(distributed=True)(ep, progress=False)
        forward, calls = session.forward, []
        session.forward = lambda batch: calls.append(batch) or forward(batch)  # count this rank's batches
        result: dict = {"basic": flat(session.calibrate(data, inputs=("normalized", "stream"), desc=None)),
                        "forwards": len(calls),
                        "one_batch": flat(session.calibrate(data[:1], desc=None))}  # rank 1 gets no batch
        session.forward = forward
        # a policy's own sums: rank 1 never created ("b",) (as after an empty shard)
        own = {("a",): torch.full((3,), rank + 1.0, dtype=torch.float64)}
        if rank == 0:
            own[("b",)] = torch.ones(2, 2, dtype=torch.float32)
        result["own_sums"] = session.reduce_sums(own)
        labels = [b.label for b in session.branches]
        try:  # ranks that disagree on what to reduce must fail loudly, not hang or mix tensors
            session.calibrate(data, labels[: 2 + rank], desc=None)
        except CalibrationError as exc:
            result["mismatch"] = str(exc)
        result["sequential"] = flat(SessionFactory("sequential", distributed=True)(ep, progress=False)
                                    .calibrate(data, desc=None))
        ctx = PolicyContext(session, data, [], count_block_params(ep, session.branches), 0.25, True, dict(OPTIONS))
        recipe = subfit(ctx)
        check_same_recipe(recipe)
        result["recipe"] = (recipe.replaced_labels(), recipe.tensors)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(args: tuple, deadline_s: float = 150.0) -> None:
    # fork: the ranks inherit the captured program (spawn would re-import torch and reload the
    # program: ~10x slower on a busy machine); the parent runs one intra-op thread, so no thread
    # pool is forked mid-use.
    context = mp.start_processes(_rank, args=args, nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {deadline_s:.0f} s")


def assert_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for label in a:
        assert a[label].keys() == b[label].keys()
        for k in a[label]:
            torch.testing.assert_close(a[label][k], b[label][k], rtol=rtol, atol=0.0, msg=f"{label} {k}")


def test_two_gloo_ranks_equal_one_process(tmp_path):
    _, ep = captured("llama", 8)
    data = batches(n=3, seed=1)  # 3 batches: shards of 2 and 1

    _spawn((f"file://{tmp_path / 'store'}", ep, str(tmp_path), data))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    assert [r["forwards"] for r in ranks] == [2, 1]  # each rank ran only its shard
    session = prepare(ep, progress=False)
    one = {"basic": flat(session.calibrate(data, inputs=("normalized", "stream"), desc=None)),
           "one_batch": flat(session.calibrate(data[:1], desc=None))}
    one["sequential"] = one["basic"]
    for key in ("basic", "one_batch", "sequential"):
        # identical on every rank, bit for bit (so every rank's policy decides the same) ...
        assert_close(ranks[1][key], ranks[0][key], rtol=0.0)
        # ... and equal to one process over all the data, to float64 rounding
        expected = one[key] if key in ("basic", "one_batch") else {
            label: {k: t for k, t in v.items() if "stream" not in k} for label, v in one[key].items()}
        assert_close(ranks[0][key], expected, rtol=1e-10)
    assert all("calibrates other branches than rank 0" in r["mismatch"] for r in ranks)
    for r in ranks:
        assert r["own_sums"][("a",)].tolist() == [3.0] * 3
        assert r["own_sums"][("b",)].dtype == torch.float32 and r["own_sums"][("b",)].tolist() == [[1.0] * 2] * 2

    ctx = PolicyContext(session, data, [], count_block_params(ep, session.branches), 0.25, True, dict(OPTIONS))
    recipe = subfit(ctx)
    labels, tensors = ranks[0]["recipe"]
    assert labels == recipe.replaced_labels() != [] and labels == ranks[1]["recipe"][0]
    assert tensors.keys() == recipe.tensors.keys()
    for k, t in tensors.items():
        torch.testing.assert_close(t, recipe.tensors[k], rtol=1e-8, atol=1e-10, msg=k)
