"""Layout-independent checkpoints: every rank saves its model and AdamW state *by parameter name* (the dense
model's names, tensor-parallel shards as slices), so any other dp x pp x tp layout can rebuild its own slices.

Under layout (tp, pp, dp) the ranks with dp_rank 0 together hold every parameter once: pipeline stages own
disjoint blocks, tensor-parallel ranks own slices along `tp_split_dim`. `assemble` concatenates those slices back
into full tensors; `local_slice` cuts the piece a rank of the new layout owns. Rank order is megatron-core's:
rank = tp_rank + tp * (dp_rank + dp * pp_rank).
"""

from __future__ import annotations

from typing import Any

import torch

from parallel.tensor_parallel import tp_split_dim

MOMENTS = ("exp_avg", "exp_avg_sq")


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, layout: dict[str, int]) -> int:
    return tp_rank + layout["tp"] * (dp_rank + layout["dp"] * pp_rank)


def source_ranks(layout: dict[str, int]) -> list[list[int]]:
    """Ranks whose shards hold the whole model once, grouped by pipeline stage, tensor-parallel rank order."""
    return [[rank_of(t, 0, p, layout) for t in range(layout["tp"])] for p in range(layout["pp"])]


def assemble(shards: dict[int, dict[str, Any]], layout: dict[str, int]) -> tuple[dict, dict]:
    """Full (model, optimizer-by-name) state from the shards of `source_ranks(layout)`."""
    model, optim = {}, {}
    for stage in source_ranks(layout):
        parts = [shards[r] for r in stage]
        for name in parts[0]["model"]:
            model[name] = _cat([p["model"][name] for p in parts], tp_split_dim(name))
        for name, st in parts[0]["optim"].items():
            optim[name] = {k: (_cat([p["optim"][name][k] for p in parts], tp_split_dim(name)) if k in MOMENTS
                               else v) for k, v in st.items()}
    return model, optim


def local_slice(name: str, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    dim = tp_split_dim(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: size {full.shape[dim]} along dim {dim} cannot be split over tp={tp}")
    return full.chunk(tp, dim)[tp_rank].clone()


def _cat(pieces: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    return pieces[0] if dim is None or len(pieces) == 1 else torch.cat(pieces, dim)
