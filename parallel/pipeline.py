"""Pipeline parallelism over a model's repeated blocks with torch.distributed.pipelining (1F1B or GPipe).

megatron-core's schedules are CUDA-bound, so the schedule is torch's; the stage split is ours, from the model's
`ParallelPlan` (common/parallel_plan.py): stage 0 owns the plan's `first_stage` modules plus its blocks, the last
stage its blocks plus the `last_stage` modules; activations and the model's side inputs (for VideoAR the attention
mask) travel between stages. Parameter names stay those of the full model (`blocks.<global index>...`), so
checkpoints and comparisons line up across layouts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.parallel_plan import ParallelPlan


def stage_block_range(blocks_per_stage: list[int], stage: int) -> range:
    start = sum(blocks_per_stage[:stage])
    return range(start, start + blocks_per_stage[stage])


class PipelineStageModule(nn.Module):
    """The part of a model that one pipeline stage runs. Set `static` (the step's non-tensor model argument)
    before each schedule step."""

    def __init__(self, model: nn.Module, plan: ParallelPlan, stage: int, num_stages: int, blocks: range):
        super().__init__()
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        all_blocks = getattr(model, plan.blocks)
        self.blocks = nn.ModuleDict({str(i): all_blocks[i] for i in blocks})
        for name in plan.first_stage:
            if self.is_first and hasattr(model, name):
                setattr(self, name, getattr(model, name))
        for name in plan.last_stage:
            if self.is_last:
                setattr(self, name, getattr(model, name))
        self._model = [model]  # not a submodule: borrowed methods only
        for i in range(len(all_blocks)):  # other stages' blocks are not kept on this rank
            if i not in blocks:
                all_blocks[i] = nn.Identity()
        self.static: Any = None

    def forward(self, *args):
        model = self._model[0]
        x, *side = model.stage_input(self.static, *args) if self.is_first else args
        x = model.stage_blocks(self.static, self.blocks.values(), x, *side)
        return model.stage_output(self.static, x) if self.is_last else (x, *side)


def split_for_pipeline(model: nn.Module, plan: ParallelPlan, blocks_per_stage: list[int], stage: int
                       ) -> PipelineStageModule:
    return PipelineStageModule(model, plan, stage, len(blocks_per_stage), stage_block_range(blocks_per_stage, stage))


def make_schedule(stage_module: PipelineStageModule, pp_group, device: torch.device, n_microbatches: int,
                  loss_fn, kind: str = "1f1b"):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(stage_module, stage_module.stage, stage_module.num_stages, device, group=pp_group)
    cls = Schedule1F1B if kind == "1f1b" else ScheduleGPipe
    # the loss function divides by the step's micro-batch count itself (several shapes can share one step)
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


def stage_parameter_names(model: nn.Module, plan: ParallelPlan, blocks_per_stage: list[int], stage: int) -> set[str]:
    """The (dense) names of the parameters pipeline stage `stage` owns: its blocks, plus the plan's first-stage
    modules on the first stage and last-stage modules on the last (what `PipelineStageModule` keeps)."""
    blocks = getattr(model, plan.blocks)
    names = {f"{plan.blocks}.{i}.{n}" for i in stage_block_range(blocks_per_stage, stage)
             for n, _ in blocks[i].named_parameters()}
    extra = (plan.first_stage if stage == 0 else ()) + (plan.last_stage if stage == len(blocks_per_stage) - 1 else ())
    for attr in (a for a in extra if hasattr(model, a)):
        obj = getattr(model, attr)
        names |= {attr} if isinstance(obj, nn.Parameter) else {f"{attr}.{n}" for n, _ in obj.named_parameters()}
    return names


def materialize_stage(model: nn.Module, plan: ParallelPlan, blocks_per_stage: list[int], stage: int,
                      device: torch.device) -> set[str]:
    """A model built on the meta device becomes this pipeline stage's part: the other stages' blocks are dropped,
    the stage's parameters allocated on `device` and initialized by `model.reset_parameters(names)` (values that
    do not depend on which parameters exist); the other stages' first/last modules stay on meta, unused. Peak
    memory at start-up is this stage's parameters, not the whole model's. Returns the stage's names."""
    names = stage_parameter_names(model, plan, blocks_per_stage, stage)
    blocks = getattr(model, plan.blocks)
    keep = stage_block_range(blocks_per_stage, stage)
    for i in range(len(blocks)):
        if i not in keep:
            blocks[i] = nn.Identity()
    for name in sorted(names):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        meta = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype, device=device),
                                          requires_grad=meta.requires_grad))
    model.reset_parameters(names)
    return names
