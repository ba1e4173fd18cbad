"""Global sample order: a seeded permutation per epoch, and the global batch of a step as a fixed slice of it.

The position in the data is one number, samples consumed, so resume is exact and does not depend on how many
ranks read the batch (each data-parallel rank takes its strided part of the same global batch).
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=2)  # every step asks for the current epoch's (at 10^7 samples a permutation takes ~0.5 s)
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """A read-only (cached) permutation of the epoch's sample indices."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


def global_batch(num_samples: int, seed: int, consumed: int, size: int) -> list[int]:
    """Indices of samples consumed .. consumed+size-1 in the epoch-wise permuted order (crossing epochs)."""
    if num_samples < 1:
        raise ValueError("the dataset is empty")
    out, pos = [], consumed
    while len(out) < size:
        epoch, offset = divmod(pos, num_samples)
        take = min(size - len(out), num_samples - offset)
        out += epoch_permutation(num_samples, seed, epoch)[offset:offset + take].tolist()
        pos += take
    return out


def rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """This data-parallel rank's strided part of a global batch."""
    return indices[rank::world]
