"""Megatron-style tensor parallelism for the VideoAR blocks with megatron-core's layers (DESIGN §4).

Per block: the QKV and SwiGLU gate/up projections become `ColumnParallelLinear` (each rank owns heads
[r*H/tp, (r+1)*H/tp) with their q, k, v, and a slice of the MLP columns), the attention output and MLP down
projections become `RowParallelLinear` (their outputs are all-reduced). RoPE, QK-norm, the masks and SDPA act
per head, so they run unchanged on the local heads; the QK-norm weights are shared by all heads, so their
partial gradients are summed over the tensor-parallel group. Embeddings, norms and the bitwise head stay
replicated.
Weights are copied from the dense model's slices, so a tp run starts from exactly the single-process weights.
"""

from __future__ import annotations

import torch
from torch import nn

from models.videoar import VideoAR

# which dense Linear of a block becomes which parallel layer, and the dimension its weight is split along
PARALLEL_LINEARS = {"attn.qkv": ("column", 0), "attn.proj": ("row", 1), "mlp.gate": ("column", 0),
                    "mlp.up": ("column", 0), "mlp.down": ("row", 1)}


class TensorParallelLinear(nn.Module):
    """A megatron-core column/row parallel layer with a plain `forward(x) -> y` (no bias returned)."""

    def __init__(self, dense: nn.Linear, kind: str, config):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        if dense.bias is not None:
            raise ValueError("tensor-parallel VideoAR layers have no bias")
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


def apply_tensor_parallel(model: VideoAR, tp: int) -> VideoAR:
    """Swap every block's projections for tensor-parallel ones (in place); tp == 1 leaves the model dense."""
    if tp == 1:
        return model
    cfg = model.cfg
    if cfg.heads % tp or cfg.mlp_hidden % tp:
        raise ValueError(f"videoar.heads={cfg.heads} and the MLP width {cfg.mlp_hidden} must be divisible by "
                         f"parallel.tp={tp}")
    mp_config = model_parallel_config(tp)
    for block in model.blocks:
        for name, (kind, _) in PARALLEL_LINEARS.items():
            owner_name, attr = name.split(".")
            owner = getattr(block, owner_name)
            setattr(owner, attr, TensorParallelLinear(getattr(owner, attr), kind, mp_config))
        # QK-norm weights are shared by all heads but each rank only sees its own heads: sum their gradients
        for p in list(block.attn.q_norm.parameters()) + list(block.attn.k_norm.parameters()):
            p.register_hook(_sum_over_tensor_parallel)
    return model


def _sum_over_tensor_parallel(grad: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    grad = grad.clone()
    dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
    return grad


def tp_split_dim(param_name: str) -> int | None:
    """The dimension a parameter is split along under tensor parallelism (None: replicated)."""
    for name, (_, dim) in PARALLEL_LINEARS.items():
        if f".{name}." in f".{param_name}":
            return dim
    return None
