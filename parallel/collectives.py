"""Every collective of the project goes through here (gloo on CPU, NCCL on CUDA: same calls), and every
process-group lookup: callers never touch `torch.distributed` or megatron-core's `parallel_state` directly
(tests/test_device_discipline.py checks it). Each helper puts its tensor on the process group's device first:
NCCL reduces only CUDA tensors, gloo here only CPU ones, so a CPU flag or metric meets a CUDA group safely.
In a single process each helper is the identity."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if initialized() else 0


def _ps():
    from megatron.core import parallel_state as ps

    return ps


def data_parallel_group():
    return _ps().get_data_parallel_group()


def context_parallel_group():
    return _ps().get_context_parallel_group()


def data_context_parallel_group():
    """dp x cp: the ranks holding the same parameters, whose gradients are averaged."""
    return _ps().get_data_parallel_group(with_context_parallel=True)


def tensor_parallel_group():
    return _ps().get_tensor_model_parallel_group()


def pipeline_group():
    return _ps().get_pipeline_model_parallel_group()


def model_parallel_group():
    """tp x pp: the ranks that together hold one copy of the model."""
    return _ps().get_model_parallel_group()


def group_device(group=None) -> torch.device:
    """Where `group`'s backend reduces tensors: this rank's CUDA device for NCCL, else the CPU."""
    if initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _op(op: str):
    if op not in ("sum", "max"):
        raise ValueError(f"collective op must be 'sum' or 'max', got {op!r}")
    return dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM


def all_reduce(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In place over `group` (default: every rank); op is sum or max. A tensor on another device than the
    group's is reduced through a copy there (one transfer each way) and written back in place."""
    if not initialized():
        return tensor
    device = group_device(group)
    if tensor.device == device:
        dist.all_reduce(tensor, op=_op(op), group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=_op(op), group=group)
    return tensor.copy_(moved)


class _Done:
    def wait(self) -> None:
        pass


def all_reduce_start(tensor: torch.Tensor, group=None):
    """Start a sum over `group` in place without waiting (gradient buckets overlap their reductions); returns a
    handle whose `wait()` completes it. A tensor off the group's device is reduced at once (as `all_reduce`)."""
    if not initialized():
        return _Done()
    if tensor.device != group_device(group):
        all_reduce(tensor, group)
        return _Done()
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_reduce_packed(tensors: list[torch.Tensor], group=None, op: str = "sum") -> list[torch.Tensor]:
    """Several tensors reduced in one collective (flattened, concatenated, split back to their shapes)."""
    if not initialized():
        return list(tensors)
    device = group_device(group)
    packed = torch.cat([t.reshape(-1).to(device) for t in tensors])
    all_reduce(packed, group, op)
    out, start = [], 0
    for t in tensors:
        out.append(packed[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def all_to_all(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-to-all over `group` along dim 0: chunk j of this rank's tensor goes to rank j, the result
    holds chunk `rank` of every rank in rank order (its backward is the reverse exchange). Context parallelism's
    sequence <-> heads re-layout (parallel/cp.py). `tensor` must be on the group's device."""
    if not initialized():
        return tensor
    from torch.distributed._functional_collectives import all_to_all_single

    return all_to_all_single(tensor.contiguous(), None, None, group)  # functional: waits on first use


def new_group(ranks: list[int], backend: str | None = None):
    """A process group of `ranks` (every rank must call it, in the same order, for every group); `backend`
    e.g. "gloo" for a CPU-side group beside NCCL (checkpoint planning from a background thread)."""
    return dist.new_group(ranks, backend=backend)


def group_rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def group_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's maximum over all ranks (one all-reduce)."""
    if not initialized():
        return dict(values)
    packed = all_reduce(torch.tensor(list(values.values()), dtype=torch.float64, device=group_device()), op="max")
    return dict(zip(values, packed.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank."""
    if not initialized():
        return flag
    flag_tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=group_device())
    return bool(all_reduce(flag_tensor, op="max").item())


def barrier() -> None:
    if initialized():
        if dist.get_backend() == "nccl":  # NCCL's barrier needs the device it should use
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
