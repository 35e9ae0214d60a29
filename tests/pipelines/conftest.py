"""Fixtures and helpers of the pipeline tests."""

from __future__ import annotations

import pytest
import torch

from subfit_fx.stats import BranchStats


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: with several intra-op threads on a busy machine they spin and wait, and a
    tiny forward gets ~100x slower; one thread keeps these tests in seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2 * n, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: token counts must still agree
    return [(ids[i:i + 2], mask[i:i + 2]) for i in range(0, 2 * n, 2)]


def flat(stats: dict[str, BranchStats]) -> dict[str, dict[str, torch.Tensor]]:
    return {label: {k: t.clone() for k, t in s.tensors().items()} for label, s in stats.items()}
