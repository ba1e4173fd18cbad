"""Megatron-style tensor parallelism of a model's blocks with megatron-core's layers (DESIGN §4), as its
`ParallelPlan` says (common/parallel_plan.py).

Per block, the plan's `column_parallel` Linears become `ColumnParallelLinear` (for VideoAR: QKV and SwiGLU gate/up,
so each rank owns heads [r*H/tp, (r+1)*H/tp) with their q, k, v, and a slice of the MLP columns) and its
`row_parallel` ones `RowParallelLinear` (attention output and MLP down; their outputs are all-reduced). What acts
per head runs unchanged on the local heads; parameters the plan marks `tp_shared` (QK-norm weights, shared by all
heads) get their partial gradients summed over the tensor-parallel group. Everything else stays replicated.
Weights are copied from the dense model's slices, so a tp run starts from exactly the single-process weights.
"""

from __future__ import annotations

import torch
from torch import nn

from common.parallel_plan import ParallelPlan
from parallel.collectives import all_reduce, tensor_parallel_group


class TensorParallelLinear(nn.Module):
    """A megatron-core column/row parallel layer with a plain `forward(x) -> y` (no bias returned)."""

    def __init__(self, dense: nn.Linear, kind: str, config):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        if dense.bias is not None:
            raise ValueError("tensor-parallel layers here have no bias")
        common = dict(config=config, init_method=nn.init.zeros_, bias=False, skip_bias_add=True)
        if kind == "column":
            self.layer = ColumnParallelLinear(dense.in_features, dense.out_features, gather_output=False, **common)
        else:
            self.layer = RowParallelLinear(dense.in_features, dense.out_features, input_is_parallel=True, **common)
        dim = 0 if kind == "column" else 1
        part = dense.weight.detach().chunk(ps.get_tensor_model_parallel_world_size(), dim)
        with torch.no_grad():
            self.layer.weight.copy_(part[ps.get_tensor_model_parallel_rank()])

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.layer(x)
        return out


def model_parallel_config(tp: int, dtype: torch.dtype = torch.float32):
    """The layers only need the tensor-parallel size (pipelining is torch's, not megatron's schedules)."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=dtype,
                               perform_initialization=True)


def apply_tensor_parallel(model: nn.Module, plan: ParallelPlan, tp: int) -> nn.Module:
    """Swap every block's planned projections for tensor-parallel ones (in place); tp == 1 leaves it dense."""
    if tp == 1:
        return model
    if any(size % tp for _, size in plan.tp_divisible):
        sizes = " and ".join(f"{what} {size}" for what, size in plan.tp_divisible)
        raise ValueError(f"{sizes} must be divisible by parallel.tp={tp}")
    mp_config = model_parallel_config(tp)
    kinds = {**{n: "column" for n in plan.column_parallel}, **{n: "row" for n in plan.row_parallel}}
    for block in getattr(model, plan.blocks):
        if isinstance(block, nn.Identity):  # another pipeline stage's block (dropped on this rank)
            continue
        for name, kind in kinds.items():
            owner_name, attr = name.rsplit(".", 1)
            owner = block.get_submodule(owner_name)
            setattr(owner, attr, TensorParallelLinear(getattr(owner, attr), kind, mp_config))
        # shared by all heads but each rank only sees its own heads: sum their gradients
        for shared in plan.tp_shared:
            for p in block.get_submodule(shared).parameters():
                p.register_hook(_sum_over_tensor_parallel)
    return model


def _sum_over_tensor_parallel(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    all_reduce(grad, tensor_parallel_group())
    return grad
