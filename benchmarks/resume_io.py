"""Bytes read and peak host memory per rank when a 4-rank job resumes: the format-2 path (every rank reads the
shards that hold the whole model, verifies every file and assembles full tensors before slicing its own) vs the
DCP path (each rank reads the saved chunks of its own slices, verifying exactly those bytes), side by side.

    python -m benchmarks.resume_io [--depth 8 --width 512 --tp 2 --pp 2]

One VideoAR (random weights and AdamW moments, fp32) is saved under tp x pp = 4 ranks in both formats; each
resume runs in fresh processes of the same layout. Bytes are what the process read (`/proc/self/io` rchar:
every read() of the resume, page cache included) and the loader's own count; peak memory is the rise of the
process's high-water RSS during the resume. Target: per-rank bytes ~ 1/4 of the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

from common.job_config import ParallelConfig
from common.model_config import VideoARConfig
from common.train_config import VideoARTrainConfig
from models.videoar import VideoAR
from parallel import checkpoint_format as fmt
from parallel.collectives import barrier
from parallel.engine import clean_name
from parallel.launch import run_local
from parallel.parallelize import parallelize
from parallel.topology import init_topology
from trainer.checkpointing import CheckpointManager, TrainState


def _rchar() -> int:
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])


def _engine(depth: int, width: int, tp: int, pp: int):
    pcfg = ParallelConfig(tp=tp, pp=pp)
    topo = init_topology(pcfg)
    torch.manual_seed(0)
    device = "meta" if pp > 1 else "cpu"
    with torch.device(device):
        model = VideoAR(VideoARConfig(preset="custom", depth=depth, width=width, heads=8, cond="class",
                                      num_classes=4), 16)
    engine = parallelize(model, model.parallel_plan(), topo, pcfg, VideoARTrainConfig(), 10, torch.device("cpu"),
                         4, 1)
    return engine, model.parallel_plan(), topo


def _manager(root: Path, engine, plan, rank: int, world: int) -> CheckpointManager:
    meta = lambda: {"layout": engine.parallel_layout, "tp_split": plan.tp_split, "config": {}}  # noqa: E731
    return CheckpointManager(root, engine, TrainState(), {}, rank, world, meta, 1, 3, False, 120.0)


def _save(rank, world, depth, width, tp, pp, root):
    """Step 1 in DCP (format 3); step 2 the same state as format-2 rank shards (tensors by name inside)."""
    engine, plan, _ = _engine(depth, width, tp, pp)
    g = torch.Generator().manual_seed(rank)
    for p in engine.params:  # AdamW state as after a step
        engine.opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn(p.shape, generator=g),
                               "exp_avg_sq": torch.rand(p.shape, generator=g)}
    _manager(root / "v3", engine, plan, rank, world).save(1)
    names = {id(p): clean_name(n) for n, p in engine.module.named_parameters()}
    legacy = {"model": {names[id(p)]: p.detach() for p in engine.params},
              "optim": {names[id(p)]: engine.opt.state[p] for p in engine.params}, **engine.state_dict()}
    tmp = fmt.begin_checkpoint(root / "v2", 2) if rank == 0 else root / "v2" / ".tmp-step-00000002"
    barrier()
    fmt.write_rank_shard(tmp, fmt.shard_name(rank), {**legacy, **TrainState().state_dict()})
    barrier()
    if rank == 0:
        final = fmt.commit_checkpoint(root / "v2", 2, tmp, {"layout": engine.parallel_layout,
                                                             "tp_split": plan.tp_split, "config": {}})
        meta = json.loads((final / "metadata.json").read_text())
        meta["format_version"] = 2  # what the trainer wrote before 2026-12-04
        (final / "metadata.json").write_text(json.dumps(meta))
    barrier()


def _resume(rank, world, depth, width, tp, pp, root, version, out):
    engine, plan, _ = _engine(depth, width, tp, pp)
    manager = _manager(root / f"v{version}", engine, plan, rank, world)
    rss0, rchar0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _rchar()
    meta = manager.load_latest()
    rss1, rchar1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _rchar()
    assert meta is not None and meta["format_version"] == version
    Path(out, f"v{version}-{rank}.json").write_text(json.dumps(
        {"rchar": rchar1 - rchar0, "counted": manager.bytes_read, "peak_kb": rss1 - rss0}))


def _checkpoint_bytes(step: Path) -> int:
    return sum(f.stat().st_size for f in step.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    args = parser.parse_args(argv)
    world = args.tp * args.pp
    with tempfile.TemporaryDirectory(dir="runs" if Path("runs").is_dir() else None) as tmp:
        root = Path(tmp)
        run_local(world, _save, args.depth, args.width, args.tp, args.pp, root)
        sizes = {v: _checkpoint_bytes(fmt.step_dir(root / f"v{v}", 4 - v)) for v in (2, 3)}
        rows = {}
        for version in (2, 3):
            run_local(world, _resume, args.depth, args.width, args.tp, args.pp, root, version, root)
            rows[version] = [json.loads((root / f"v{version}-{r}.json").read_text()) for r in range(world)]
    mb = 2**20
    print(f"VideoAR depth {args.depth} width {args.width}, fp32 weights + AdamW moments, resumed by tp {args.tp} x "
          f"pp {args.pp} = {world} ranks; checkpoint {sizes[2] / mb:.0f} MB (format 2), {sizes[3] / mb:.0f} MB (DCP)")
    print(f"{'path':<34} {'rank':>4} {'bytes read MB':>14} {'/ checkpoint':>13} {'counted MB':>11} {'peak +MB':>9}")
    for version, label in ((2, "format 2 (assemble whole, slice)"), (3, "DCP (own chunks)")):
        for r, row in enumerate(rows[version]):
            print(f"{label:<34} {r:>4} {row['rchar'] / mb:>14.1f} {row['rchar'] / sizes[version]:>13.2f} "
                  f"{row['counted'] / mb:>11.1f} {row['peak_kb'] / 1024:>9.1f}")
    mean = {v: sum(r["rchar"] for r in rows[v]) / world / sizes[v] for v in rows}
    print(f"mean per-rank bytes / checkpoint: format 2 {mean[2]:.2f}, DCP {mean[3]:.2f} (target ~{1 / world:.2f}); "
          f"ratio {mean[3] / mean[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
