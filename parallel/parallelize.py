"""Apply a model's `ParallelPlan` for a layout and return the engine that trains it (torchtitan's
`parallelize_*`): tensor parallelism as the plan says, then pipeline stages (TorchEngine, pp > 1) or DeepSpeed ZeRO
(zero_stage > 0)."""

from __future__ import annotations

import torch
from torch import nn

from common.job_config import ParallelConfig
from common.parallel_plan import ParallelPlan
from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.engine import Engine, TorchEngine
from parallel.pipeline import materialize_stage
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import Topology


def parallelize(model: nn.Module, plan: ParallelPlan, topo: Topology, pcfg: ParallelConfig, tcfg, total_steps: int,
                device: torch.device, global_batch: int, micro_batch: int) -> Engine:
    """Tensor parallelism applied as the plan says, then the engine the layout needs (ZeRO > 0: DeepSpeed)."""
    if any(p.is_meta for p in model.parameters()):  # built on meta: this pipeline stage's part only, on device
        if topo.pp == 1:
            raise ValueError("a model on the meta device is materialized per pipeline stage (parallel.pp > 1); "
                             "build it on the device for pp = 1")
        blocks = pcfg.blocks_per_stage(len(getattr(model, plan.blocks)))
        materialize_stage(model, plan, blocks, topo.pp_rank, device)
        model = apply_tensor_parallel(model, plan, pcfg.tp)
    else:
        model = apply_tensor_parallel(model, plan, pcfg.tp).to(device)
    if pcfg.zero_stage > 0:
        return DeepSpeedEngine(model, plan, topo, pcfg, tcfg, total_steps, device, global_batch, micro_batch)
    return TorchEngine(model, plan, topo, pcfg, tcfg, total_steps, device)
