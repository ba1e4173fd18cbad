"""The capacity planner (parallel/plan.py) against measurement on CPU: per-rank peak memory of a training step and
the bytes each parallel dimension sends, predicted vs measured side by side, for several small layouts.

    python -m benchmarks.plan_validation [--depth 4 --width 256 --heads 4 --frames 6 --micro-batch 2]
        [--layouts single,ac,tp2,dp2,zero2,cp2]

Each layout trains two optimizer steps of the same small VideoAR (text prefix of 16 tokens, per latent frame the
scales 1,2,3,4,6,8 = 130 tokens; fp32, the block-sparse `tiled` kernel, 2 micro-batches a step, so gradients are
alive while the second one runs, as with any accumulation) in 1 or 2 gloo processes through the project's engines
(`parallel.parallelize`). Memory: the persistent tensors of the rank after the first step (parameters and every
tensor reachable from the optimizer, counted once by storage, as benchmarks/zero_memory.py does), plus the peak of
the storages created during the second step, tracked at the dispatcher (a TorchDispatchMode that adds every new
output storage and subtracts it when it is freed): the rank's peak tensor memory, what the planner predicts.
Bytes: every collective op of the second step seen at the dispatcher (c10d all-reduce, all-to-all, reduce-scatter,
all-gather), as wire bytes one rank sends (ring all-reduce 2 (n-1)/n of the payload, the others (n-1)/n), split
into the large ones (the layout's parallel dimension) and small ones (loss statistics, flags, QK-norm gradients; < 256 bytes). DeepSpeed
on gloo all-reduces its gradient buckets where NCCL would reduce-scatter; the prediction here says the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.zero_memory import _bytes, _tensors
from common.job_config import ParallelConfig
from common.model_config import VideoARConfig
from common.train_config import VideoARTrainConfig
from models.objective import BitObjective, MicroBatch
from models.videoar import VideoAR
from parallel.launch import run_local
from parallel.parallelize import parallelize
from parallel.plan_model import Layout, Precision, Shape, comm_bytes, dp_bytes, memory
from parallel.topology import init_topology

SCALES = tuple((s, s) for s in (1, 2, 3, 4, 6, 8))
LATENT, TEXT_LEN, TEXT_DIM, MICRO_STEPS = 16, 16, 32, 2
LAYOUTS = {  # name -> (world, Layout fields)
    "single": (1, dict()), "ac": (1, dict(ac=True)), "tp2": (2, dict(tp=2)), "dp2": (2, dict(dp=2)),
    "zero2": (2, dict(dp=2, zero=2)), "cp2": (2, dict(cp=2)),
}
COLLECTIVES = ("allreduce", "all_reduce", "all_to_all", "alltoall", "reduce_scatter", "allgather", "all_gather",
               "broadcast")
SMALL = 256  # bytes: collectives below this are statistics, flags and QK-norm gradients, not a dimension's traffic


class Tracker(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (each counted once until freed), and the wire
    bytes of every collective op that passes."""

    def __init__(self, world: int):
        super().__init__()
        self.world, self.live, self.now, self.peak = world, {}, 0, 0
        self.sent = {"large": 0.0, "small": 0.0, "ops": {}}  # ops: name -> [calls, wire bytes]

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def _collective(self, name: str, args) -> None:
        sizes = [t.numel() * t.element_size() for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
        payload, n = max(sizes, default=0), self.world  # all-gather: the output, reduce-scatter: the input
        wire = (2 if "allreduce" in name or "all_reduce" in name else 1) * (n - 1) / n * payload
        self.sent["large" if payload >= SMALL else "small"] += wire
        op = self.sent["ops"].setdefault(name, [0, 0.0])
        op[0], op[1] = op[0] + 1, op[1] + wire

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("c10d.", "_c10d_functional.")) and any(k in name for k in COLLECTIVES):
            self._collective(name, args)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                try:
                    key = storage.data_ptr()
                except RuntimeError:  # a functional collective's output before its wait: counted once it is
                    continue
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out


def model_config(depth: int, width: int, heads: int) -> VideoARConfig:
    return VideoARConfig(preset="custom", depth=depth, width=width, heads=heads, cond="text", text_len=TEXT_LEN,
                         text_dim=TEXT_DIM, attention="flex", sparse_kernel="tiled")


def _micro_batches(model: VideoAR, frames: int, batch: int) -> list[MicroBatch]:
    layout = model.layout_for(frames, SCALES)
    n = layout.length - layout.prefix_len
    g = torch.Generator().manual_seed(1)
    return [MicroBatch(torch.randn(batch, n, LATENT, generator=g), torch.rand(batch, n, LATENT, generator=g) > 0.5,
                       torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), torch.zeros(batch, dtype=torch.bool),
                       None, torch.zeros(batch), layout) for _ in range(MICRO_STEPS)]


def _persistent(engine, zero: int) -> int:
    params = [getattr(p, "ds_tensor", p) if zero == 3 else p for p in engine.module.parameters()]
    opt = engine.engine.optimizer if zero else engine.opt
    grads = {id(p.grad) for p in engine.module.parameters() if p.grad is not None}
    return _bytes(params + [t for t in _tensors(opt, set()) if id(t) not in grads])


def _measure(rank: int, world: int, sizes: dict, fields: dict, out: str) -> None:
    lay = Layout(**fields)
    pcfg = ParallelConfig(tp=lay.tp, cp=lay.cp, zero_stage=lay.zero, activation_checkpointing=lay.ac)
    topo = init_topology(pcfg)
    torch.manual_seed(0)
    model = VideoAR(model_config(sizes["depth"], sizes["width"], sizes["heads"]), LATENT)
    model.checkpoint_blocks = lay.ac
    batch = sizes["micro_batch"]
    global_batch = batch * MICRO_STEPS * lay.dp
    engine = parallelize(model, model.parallel_plan(), topo, pcfg, VideoARTrainConfig(precision="fp32"), 10,
                         torch.device("cpu"), global_batch, batch)
    micro = _micro_batches(model, sizes["frames"], batch)
    objective = BitObjective(micro[0].layout.length - micro[0].layout.prefix_len)
    engine.forward_backward([(micro, objective)])
    engine.step()
    base = _persistent(engine, lay.zero)
    with Tracker(world) as tracker:
        engine.forward_backward([(micro, objective)])
        engine.step()
    if rank == 0:
        Path(out).write_text(json.dumps({"peak": base + tracker.peak, "persistent": base, **tracker.sent,
                                         "length": micro[0].layout.length}))


def predict(sizes: dict, fields: dict) -> dict:
    """The planner's figures for one validation layout: memory by kind and bytes sent per step."""
    lay = Layout(micro_batch=sizes["micro_batch"], **fields)
    cfg = model_config(sizes["depth"], sizes["width"], sizes["heads"])
    shape = Shape("v", TEXT_LEN, sizes["frames"], SCALES, sizes["micro_batch"] * MICRO_STEPS * lay.dp)
    prec = Precision("fp32", "fp32", "tiled")
    mem = memory(cfg, LATENT, [shape], lay, prec)
    comm = comm_bytes(cfg, LATENT, shape, lay, prec)
    dp = dp_bytes(cfg, LATENT, lay, prec, MICRO_STEPS, reduce_scatter=False)  # DeepSpeed on gloo all-reduces
    return {"memory": mem, "bytes": comm["tp"] + comm["cp"] + dp, "by_dim": {"tp": comm["tp"], "cp": comm["cp"], "dp": dp}}


def validate(sizes: dict, names: list[str], tmp: str) -> dict[str, dict]:
    """name -> {"predicted": planner figures, "measured": rank 0's measurement}."""
    rows = {}
    for name in names:
        world, fields = LAYOUTS[name]
        out = Path(tmp) / f"{name}.json"
        run_local(world, _measure, sizes, fields, str(out))
        rows[name] = {"predicted": predict(sizes, fields), "measured": json.loads(out.read_text())}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--frames", type=int, default=6, help="latent frames (6 x 130 + 16 = 796 tokens)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    args = parser.parse_args(argv)
    names = args.layouts.split(",")
    if bad := [n for n in names if n not in LAYOUTS]:
        parser.error(f"unknown layouts {bad}")
    sizes = {"depth": args.depth, "width": args.width, "heads": args.heads, "frames": args.frames,
             "micro_batch": args.micro_batch}
    with tempfile.TemporaryDirectory() as tmp:
        rows = validate(sizes, names, tmp)
    mb = 2**20
    print(f"VideoAR {args.depth} x {args.width} ({args.heads} heads), {rows[names[0]]['measured']['length']} "
          f"tokens, micro-batch {args.micro_batch} x {MICRO_STEPS}, fp32, tiled block-sparse attention; per rank")
    print(f"{'layout':<7} | {'pred MB':>8} {'meas MB':>8} {'ratio':>6} | {'pred acts+ MB':>13} {'meas MB':>8} | "
          f"{'pred sent MB':>12} {'meas MB':>8} {'small KB':>8}")
    for name, r in rows.items():
        p, m = r["predicted"], r["measured"]
        states = p["memory"]["parameters"] + p["memory"]["optimizer"]
        print(f"{name:<7} | {p['memory']['total'] / mb:>8.1f} {m['peak'] / mb:>8.1f} "
              f"{m['peak'] / p['memory']['total']:>6.3f} | {(p['memory']['total'] - states) / mb:>13.1f} "
              f"{(m['peak'] - m['persistent']) / mb:>8.1f} | {p['bytes'] / mb:>12.2f} {m['large'] / mb:>8.2f} "
              f"{m['small'] / 1024:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
