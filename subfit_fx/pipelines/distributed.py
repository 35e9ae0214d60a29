"""Data-parallel calibration on torch.distributed: each rank sees its shard, statistics are summed.

Statistics are additive (METHOD.md), so the float64 all-reduce (sum) of per-rank statistics equals,
to float64 rounding, the statistics of one process over all batches. `AllReduce` is the `Reducer`
strategy of a `Session` that does this: every pass through `Session.run` (calibration included)
covers only this rank's shard, and the statistics of each observation (`Session.observe`) are
summed over ranks at its end. Every rank then holds bitwise identical statistics (ring and tree
all-reduces give every rank the same bits), so every policy, SubFit and the baselines, runs
unchanged and deterministically on all ranks, and only rank 0 writes.

What is not sharded: `Session.forward` (one batch). Held-out losses (`heldout_loss`) and dense
references use it, so every rank evaluates the full holdout: identical results, no speed-up there
(the holdout is a small fraction of the data). A policy that sums something itself over
`session.run` (hooks, `each=`) sees only its shard and must sum it over ranks:
`session.reduce_sums(sums)` (`all_reduce_tensors`), or `all_reduce_sum` for a few numbers.

Launch with torchrun (see docs/distributed.md); without an initialized process group everything
here is a no-op and `AllReduce` is a `LocalReducer`.

Example:
    >>> [len(shard_batches(range(5), rank, 2)) for rank in (0, 1)]
    [3, 2]
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Hashable, Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from subfit_fx.data import Batch
from subfit_fx.errors import CalibrationError, InputError
from subfit_fx.recipe import Recipe
from subfit_fx.stats import BranchStats

__all__ = [
    "AllReduce",
    "all_reduce_stats",
    "all_reduce_sum",
    "all_reduce_tensors",
    "check_same_recipe",
    "init_distributed",
    "rank_and_world",
    "shard_batches",
]

T = TypeVar("T")


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(rank, world size) in `group` (default: the world), or (0, 1) without a process group.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR... in the
    environment); returns (rank, world size). Outside torchrun, and when a group already exists,
    it starts nothing. Backend: nccl when CUDA is available, else gloo.

    Example:
        >>> init_distributed()  # not under torchrun: one process
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return rank_and_world()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return 0, 1
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed; install a build with it or run one process")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return rank_and_world()


def shard_batches(batches: Iterable[T], rank: int, world: int) -> list[T]:
    """This rank's batches: every `world`-th one from `rank` (balanced to within one batch;
    any partition gives the same summed statistics). A rank may get none.

    Example:
        >>> shard_batches(["a", "b", "c"], 1, 2)
        ['b']
    """
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"rank {rank} is not in a world of {world}; pass 0 <= rank < world")
    return list(batches)[rank::world]


def _comm_device(group: Any) -> torch.device:
    # NCCL reduces device tensors only; gloo reduces CPU tensors (statistics live on the CPU).
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_layout(stats: dict[str, BranchStats], group: Any) -> None:
    """Fail with a clear message, instead of hanging or summing mismatched tensors, when ranks
    reduce different branches (ranks ran different policies or models)."""
    layout = "|".join(f"{label}/{name}/{tuple(t.shape)}" for label, s in stats.items()
                      for name, t in s.tensors().items())
    device = _comm_device(group)
    mine = torch.tensor([zlib.crc32(layout.encode()), len(stats)], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, everyone[0]):
            raise CalibrationError(
                f"rank {rank} calibrates other branches than rank 0 ({int(theirs[1])} vs {int(everyone[0][1])}); "
                "every rank must run the same method, options and model; launch all ranks with the same arguments")


@torch.no_grad()
def all_reduce_stats(stats: dict[str, BranchStats], group: Any = None) -> dict[str, BranchStats]:
    """Sum `stats` over the ranks of `group` in place (float64; one flat all-reduce per branch,
    so the extra memory is one branch) and return them. A no-op without a process group.

    Every rank must pass the same labels in the same order with the same input kinds.

    Example:
        >>> s = {"b": BranchStats.empty(2, 2)}
        >>> all_reduce_stats(s) is s  # one process: nothing to sum
        True
    """
    _, world = rank_and_world(group)
    if world == 1:
        return stats
    _check_same_layout(stats, group)
    device = _comm_device(group)
    for s in stats.values():
        tensors = list(s.tensors().values())
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.cpu()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return stats


def all_reduce_sum(values: Sequence[float], group: Any = None) -> list[float]:
    """Sum a few numbers over ranks (float64), e.g. a loss total and a token count that a policy
    accumulated over its shard in `session.run(..., each=...)`. Identity without a process group.

    Example:
        >>> all_reduce_sum([1.5, 2.0])
        [1.5, 2.0]
    """
    _, world = rank_and_world(group)
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.cpu().tolist()


@torch.no_grad()
def all_reduce_tensors(tensors: dict[Hashable, torch.Tensor], group: Any = None) -> dict[Hashable, torch.Tensor]:
    """Sum named tensors over ranks (in float64, returned in their dtype) into a new dict, keys
    in a fixed order. A name that some rank lacks (its shard was empty, so it never created it)
    counts as zeros there; names must be picklable. Identity without a process group.

    Example:
        >>> all_reduce_tensors({("span", 0, 1): torch.ones(3)})
        {('span', 0, 1): tensor([1., 1., 1.])}
    """
    _, world = rank_and_world(group)
    if world == 1:
        return tensors
    layouts: list[Any] = [None] * world
    dist.all_gather_object(layouts, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], group=group)
    union: dict[Hashable, tuple[tuple[int, ...], torch.dtype]] = {}
    for rank, layout in enumerate(layouts):
        for key, shape, dtype in layout:
            if union.setdefault(key, (shape, dtype)) != (shape, dtype):
                raise CalibrationError(f"rank {rank} holds {key!r} as {shape} {dtype}, another rank as "
                                       f"{union[key][0]} {union[key][1]}; every rank must run the same policy")
    keys = sorted(union, key=repr)
    parts = [tensors[k].double().reshape(-1) if k in tensors else torch.zeros(union[k][0], dtype=torch.float64)
             .reshape(-1) for k in keys]
    flat = torch.cat(parts).to(_comm_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat, out, offset = flat.cpu(), {}, 0
    for key in keys:
        shape, dtype = union[key]
        n = math.prod(shape)
        out[key] = flat[offset:offset + n].reshape(shape).to(dtype).clone()
        offset += n
    return out


def _recipe_digest(recipe: Recipe) -> int:
    crc = zlib.crc32(repr([(r.labels, r.action, r.form, r.input, r.layers) for r in recipe.replacements]).encode())
    for key in sorted(recipe.tensors):
        raw = recipe.tensors[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        crc = zlib.crc32(raw.numpy().tobytes(), zlib.crc32(key.encode(), crc))
    return crc


def check_same_recipe(recipe: Recipe, group: Any = None) -> None:
    """Fail when ranks arrived at different recipes (bitwise: labels, forms and weights).

    Ranks hold identical statistics, so a difference means non-deterministic forward passes
    (held-out scores, re-scoring) on some device. A no-op without a process group.

    Example:
        >>> check_same_recipe(Recipe("subfit", [], []))  # one process: nothing to compare
    """
    _, world = rank_and_world(group)
    if world == 1:
        return
    mine = torch.tensor([_recipe_digest(recipe)], dtype=torch.int64, device=_comm_device(group))
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    differ = [rank for rank, theirs in enumerate(everyone) if not torch.equal(theirs, everyone[0])]
    if differ:
        raise CalibrationError(
            f"ranks {differ} computed a different recipe than rank 0 although their statistics are identical; "
            "held-out or re-scoring passes were not deterministic: call torch.use_deterministic_algorithms(True) "
            "or run the method in one process")


class AllReduce:
    """The data-parallel `Reducer`: this rank runs its shard of the batches; statistics and a
    policy's own sums are summed over the ranks of `group`. Without a process group it is local.

    Example:
        >>> AllReduce().world  # no process group: one rank
        1
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank, self.world = rank_and_world(group)

    def shard(self, batches: list[Batch]) -> list[Batch]:
        """This rank's shard."""
        return shard_batches(batches, self.rank, self.world)

    def stats(self, stats: dict[str, BranchStats]) -> dict[str, BranchStats]:
        """Summed over ranks, in place (every rank must observe the same labels)."""
        return all_reduce_stats(stats, self.group)

    def sums(self, sums: dict[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Summed over ranks (`all_reduce_tensors`)."""
        return all_reduce_tensors(sums, self.group)
