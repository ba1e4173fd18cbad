"""Pipeline parallelism over VideoAR blocks with torch.distributed.pipelining (1F1B or GPipe micro-batching).

megatron-core's schedules are CUDA-bound, so the schedule is torch's; the stage split is ours: stage 0 owns the
condition prefix and input embeddings plus its blocks, the last stage its blocks plus the final norm and bitwise
head; activations (B, L, width) and the attention mask travel between stages. Parameter names stay those of the
full model (`blocks.<global index>...`), so checkpoints and comparisons line up across layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layout import SequenceLayout
from models.videoar import VideoAR

FIRST_ONLY = ("cond_proj", "class_embed", "null_prefix", "sos_embed", "scale_embed", "input_proj")
LAST_ONLY = ("norm", "head")


def stage_block_range(blocks_per_stage: list[int], stage: int) -> range:
    start = sum(blocks_per_stage[:stage])
    return range(start, start + blocks_per_stage[stage])


class PipelineStageModule(nn.Module):
    """The part of a VideoAR that one pipeline stage runs. Set `layout` before each schedule step."""

    def __init__(self, model: VideoAR, stage: int, num_stages: int, blocks: range):
        super().__init__()
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.cfg, self.latent_dim = model.cfg, model.latent_dim
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        for name in FIRST_ONLY:
            if self.is_first and hasattr(model, name):
                setattr(self, name, getattr(model, name))
        for name in LAST_ONLY:
            if self.is_last:
                setattr(self, name, getattr(model, name))
        self._model = [model]  # not a submodule: borrowed methods only
        for i in range(len(model.blocks)):  # other stages' blocks are not kept on this rank
            if i not in blocks:
                model.blocks[i] = nn.Identity()
        self.layout: SequenceLayout | None = None

    def forward(self, *args):
        model, lt = self._model[0], self._model[0].tensors(self.layout)
        if self.is_first:
            features, cond, drop, mask = args
            model_parts = model
            x = torch.cat([model_parts.prefix(cond, drop.bool()),
                           model_parts.embed_video(features, lt, 0, features.shape[1])], dim=1)
        else:
            x, mask = args
        x = model.run_blocks(self.blocks.values(), x, lt.angles, mask.bool()[:, None])
        if self.is_last:
            return model.logits(x[:, self.layout.prefix_len:])
        return x, mask


def split_for_pipeline(model: VideoAR, blocks_per_stage: list[int], stage: int) -> PipelineStageModule:
    return PipelineStageModule(model, stage, len(blocks_per_stage), stage_block_range(blocks_per_stage, stage))


def make_schedule(stage_module: PipelineStageModule, pp_group, device: torch.device, n_microbatches: int,
                  loss_fn, kind: str = "1f1b"):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(stage_module, stage_module.stage, stage_module.num_stages, device, group=pp_group)
    cls = Schedule1F1B if kind == "1f1b" else ScheduleGPipe
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn)
