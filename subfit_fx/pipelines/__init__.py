"""Calibration pipelines (llm-compressor's split): *basic* observes every branch in one pass;
*sequential* goes layer by layer with one layer's statistics alive at a time; either runs in one
process or data-parallel over torch.distributed (statistics all-reduced in float64).

Each is a strategy a `Session` is built with (`SessionFactory`), so every policy runs on any of
them unchanged.

Example:
    >>> from subfit_fx.pipelines import SessionFactory
    >>> SessionFactory("sequential").pipeline
    'sequential'
"""

from __future__ import annotations

from subfit_fx.pipelines.compose import PIPELINES, SessionFactory, compress_distributed
from subfit_fx.pipelines.distributed import (
    AllReduce,
    all_reduce_stats,
    all_reduce_sum,
    all_reduce_tensors,
    check_same_recipe,
    init_distributed,
    rank_and_world,
    shard_batches,
)
from subfit_fx.pipelines.sequential import (
    LayerByLayer,
    SequentialResult,
    layer_groups,
    offload_stats,
    sequential_calibrate,
    stats_nbytes,
)

__all__ = [
    "PIPELINES",
    "AllReduce",
    "LayerByLayer",
    "SequentialResult",
    "SessionFactory",
    "all_reduce_stats",
    "all_reduce_sum",
    "all_reduce_tensors",
    "check_same_recipe",
    "compress_distributed",
    "init_distributed",
    "layer_groups",
    "offload_stats",
    "rank_and_world",
    "sequential_calibrate",
    "shard_batches",
    "stats_nbytes",
]
