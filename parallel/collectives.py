"""Every collective of the project goes through here (gloo on CPU, NCCL on CUDA: same calls), and every
process-group lookup: callers never touch `torch.distributed` or megatron-core's `parallel_state` directly.
In a single process each helper is the identity."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ps():
    from megatron.core import parallel_state as ps

    return ps


def data_parallel_group():
    return _ps().get_data_parallel_group()


def tensor_parallel_group():
    return _ps().get_tensor_model_parallel_group()


def pipeline_group():
    return _ps().get_pipeline_model_parallel_group()


def model_parallel_group():
    """tp x pp: the ranks that together hold one copy of the model."""
    return _ps().get_model_parallel_group()


def all_reduce(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In place over `group` (default: every rank); op is sum or max."""
    if initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_packed(tensors: list[torch.Tensor], group=None, op: str = "sum") -> list[torch.Tensor]:
    """Several tensors reduced in one collective (flattened, concatenated, split back to their shapes)."""
    if not initialized():
        return list(tensors)
    packed = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce(packed, group, op)
    out, start = [], 0
    for t in tensors:
        out.append(packed[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's maximum over all ranks (one all-reduce)."""
    if not initialized():
        return dict(values)
    packed = all_reduce(torch.tensor(list(values.values()), dtype=torch.float64), op="max")
    return dict(zip(values, packed.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank."""
    if not initialized():
        return flag
    return bool(all_reduce(torch.tensor([1 if flag else 0], dtype=torch.int32), op="max").item())


def barrier() -> None:
    if initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
