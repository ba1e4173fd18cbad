"""Context parallelism (parallel/cp.py, issue 17) on real gloo processes: cp = 2 ranks each holding half of a
sample's tokens compute the single-process model's logits (their slices) and, with the loss as a share of the
sample's mean and gradients summed over the group, its parameter gradients (fp32, 1e-5), for dense SDPA and the
block-sparse kernel, with text padding and the Random Frame Mask. The re-layout is its own inverse."""

from __future__ import annotations

import copy

import pytest
import torch

from common.job_config import ParallelConfig
from common.model_config import VideoARConfig
from models.attention_mask import frame_visibility
from models.objective import bit_loss
from models.videoar import VideoAR
from parallel.collectives import all_reduce, group_rank, group_size, new_group
from parallel.cp import (apply_context_parallel, heads_to_seq, local_loss_scale, local_video_slice,
                         seq_to_heads, sequence_slice)
from parallel.launch import run_local
from parallel.topology import init_topology

SCALES = ((1, 1), (2, 2), (3, 3), (4, 4))  # 30 tokens per frame: 16 + 3 x 30 = 106 tokens, even


def _model(attention: str) -> VideoAR:
    cfg = VideoARConfig(preset="custom", depth=2, width=32, heads=4, cond="text", text_len=16, text_dim=12,
                        attention=attention, sparse_kernel="tiled")
    torch.manual_seed(0)
    model = VideoAR(cfg, 8)
    for p in model.parameters():  # the zero-initialised head would make every logit 0
        torch.nn.init.normal_(p, std=0.2)
    return model


def _inputs(layout):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, layout.length - layout.prefix_len, 8, generator=g)
    cond = torch.randn(2, 16, 12, generator=g)
    cond[0, 5:] = 0  # text padding
    targets = torch.rand(2, layout.length - layout.prefix_len, 8, generator=g) > 0.5
    return feats, cond, targets, frame_visibility(2, layout.num_frames, 0, 0.5, g)


def _cp_rank(rank, world, attention, out):
    init_topology(ParallelConfig())  # gloo over loopback (the trainer's rendezvous)
    group = new_group(list(range(world)))
    cp, cp_rank = group_size(group), group_rank(group)
    model = _model(attention)
    ref = copy.deepcopy(model)
    layout = model.layout_for(3, SCALES)
    feats, cond, targets, vis = _inputs(layout)
    ref_logits = ref(cond, feats, layout, vis)
    bit_loss(ref_logits, targets)[0].backward()
    apply_context_parallel(model, model.parallel_plan(), cp, cp_rank, group, layout.length)
    logits = model(cond, feats, layout, vis)
    video = local_video_slice(layout.prefix_len, layout.length, cp, cp_rank)
    n_local, n_total = video.stop - video.start, layout.length - layout.prefix_len
    loss = bit_loss(logits, targets[:, video])[0] * local_loss_scale(n_local, n_total, cp)
    loss.backward()
    worst = 0.0
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        # a rank whose tokens do not reach a parameter (rank 1: the prefix projection) contributes zeros
        grad = all_reduce(torch.zeros_like(p) if p.grad is None else p.grad.clone(), group) / cp  # dp x cp mean
        if r.grad is None:  # unused by the sample (the null prefix without dropout)
            assert not grad.any(), name
            continue
        worst = max(worst, ((grad - r.grad).norm() / r.grad.norm().clamp_min(1e-12)).item())
    torch.save({"logit_err": (logits - ref_logits[:, video]).abs().max().item(), "grad_rel": worst,
                "tokens": n_local}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_cp2_equals_one_process_logits_and_gradients(attention, tmp_path):
    run_local(2, _cp_rank, attention, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert sum(r["tokens"] for r in results) == 3 * 30  # every video token is some rank's
    for r in results:
        assert r["logit_err"] <= 1e-5 and r["grad_rel"] <= 1e-5, r


def test_relayout_round_trip_and_slices():
    """Without a process group the exchange is the identity, so seq_to_heads/heads_to_seq with cp = 1 return
    their input; slices cover the sequence once and an uneven split is refused with the numbers."""
    x = torch.randn(2, 4, 10, 8)
    assert torch.equal(heads_to_seq(seq_to_heads(x, 1, None), 1, None), x)
    assert [sequence_slice(106, 2, r) for r in range(2)] == [slice(0, 53), slice(53, 106)]
    assert local_video_slice(16, 106, 2, 0) == slice(0, 37) and local_video_slice(16, 106, 2, 1) == slice(37, 90)
    with pytest.raises(ValueError, match="107 tokens"):
        sequence_slice(107, 2, 0)
