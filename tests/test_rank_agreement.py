"""Multi-rank pieces of the cluster path on gloo: bucketed, overlapped gradient averaging equals per-parameter
averaging; ranks resume the same step when one rank cannot read the newest one; a run.dir that is not shared
is refused on every rank; collectives accept tensors off the group's device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parallel.checkpoint_format import committed_steps, step_dir
from parallel.collectives import all_reduce, all_reduce_packed, data_parallel_group, group_device
from parallel.grad_buckets import GradBuckets
from parallel.launch import run_local
from parallel.topology import init_topology
from common.job_config import ParallelConfig
from tests.conftest import make_cfg
from trainer.checkpointing import check_shared_run_dir
from trainer.train_videoar import VideoARTrainer

STAGE = ("curriculum=[{name: s, until_step: 4, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 1, flip_start: 0.2, flip_end: 0.2}]")


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


def _buckets_worker(rank, world, out):
    init_topology(ParallelConfig())
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))  # each rank its own data
    results = {}
    for mode in ("per_param", "buckets_overlapped", "buckets_after"):
        net = _net(0)
        if mode == "per_param":
            for micro in x.chunk(2):
                (net(micro).square().mean() / 2).backward()
            for p in net.parameters():
                all_reduce(p.grad, data_parallel_group())
                p.grad.div_(world)
        else:
            buckets = GradBuckets(list(net.parameters()), data_parallel_group(), world, bucket_elems=40)
            assert len(buckets.buckets) > 2 and buckets.overlap
            for i, micro in enumerate(x.chunk(2)):
                if i == 1 and mode == "buckets_overlapped":
                    buckets.arm()  # reductions start inside the last backward
                (net(micro).square().mean() / 2).backward()
            started = sum(b.handle is not None for b in buckets.buckets)
            assert started == (len(buckets.buckets) if mode == "buckets_overlapped" else 0)
            buckets.reduce()
        results[mode] = [p.grad.clone() for p in net.parameters()]
    # a CPU tensor against the group: reduced in place (gloo's device is the CPU; NCCL's path is the same helper)
    assert group_device() == torch.device("cpu")
    packed = all_reduce_packed([torch.tensor(float(rank)), torch.ones(2, dtype=torch.float64)])
    results["packed"] = [packed[0].clone(), packed[1].clone()]
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_bucketed_overlapped_gradient_averaging_equals_per_parameter(tmp_path):
    run_local(2, _buckets_worker, tmp_path)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for mode in ("buckets_overlapped", "buckets_after"):
            for a, b in zip(got["per_param"], got[mode]):
                assert torch.equal(a, b), mode  # dp = 2: a sum of two is exact in any order
        assert got["packed"][0].item() == 1.0
        assert torch.equal(got["packed"][1], torch.full((2,), 2.0, dtype=torch.float64))
    other = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / "rank0.pt", weights_only=True)["per_param"],
                                                  other["per_param"]))


def _resume_worker(rank, world, clips_dir, tokenizer_ckpt, run_dir, out):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, run_dir, STAGE, "videoar_train.ckpt_every=2")
    VideoARTrainer(cfg, progress=False).train()
    if rank == 1:  # only rank 1's shard of the newest step is damaged: rank 0 alone could still read step 4
        shard = step_dir(run_dir / "videoar" / "checkpoints", 4) / "rank-00001.pt"
        shard.write_bytes(shard.read_bytes()[:100])
    resumed = VideoARTrainer(cfg, progress=False)
    ok = resumed.maybe_resume()
    torch.save({"ok": ok, "step": resumed.step}, f"{out}/resume{rank}.pt")


@pytest.mark.slow
def test_ranks_fall_back_together_when_one_cannot_read_the_newest_step(clips_dir, tokenizer_ckpt, tmp_path):
    run_local(2, _resume_worker, clips_dir, tokenizer_ckpt, tmp_path / "run", tmp_path)
    assert committed_steps(tmp_path / "run" / "videoar" / "checkpoints") == [2, 4]
    got = [torch.load(tmp_path / f"resume{r}.pt", weights_only=True) for r in range(2)]
    assert got[0] == got[1] == {"ok": True, "step": 2}


def _shared_dir_worker(rank, world, base, out):
    init_topology(ParallelConfig())
    try:
        # a different directory per rank: not shared
        check_shared_run_dir(base / f"node{rank}", rank, world, settle_s=1.0)
        result = "accepted"
    except RuntimeError as e:
        result = str(e)
    (out / f"shared{rank}.txt").write_text(result)


@pytest.mark.slow
def test_a_run_dir_not_shared_by_all_ranks_is_refused_on_every_rank(tmp_path):
    run_local(2, _shared_dir_worker, tmp_path, tmp_path)
    for r in range(2):
        assert "run.dir must be on a filesystem all nodes share" in (tmp_path / f"shared{r}.txt").read_text()
