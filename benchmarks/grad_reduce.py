"""Data-parallel gradient averaging, one collective per parameter (the old ZeRO-0 engine) vs 25M-element buckets
(parallel/grad_buckets.py), and buckets started inside the last backward (overlap), measured side by side.

    python -m benchmarks.grad_reduce [--depth 4 --width 512 --repeats 5]

Two gloo processes on this machine, a VideoAR of the given size, one micro-batch: the time of backward + gradient
averaging per step (median). On CPU/gloo the saving is the per-collective overhead; on NCCL it is also the
launch latency of ~10 small kernels per block, and overlap hides the reduction behind the backward.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from common.job_config import ParallelConfig
from common.model_config import VideoARConfig
from models.quantizer import MultiScaleBitwiseQuantizer, QuantizerConfig
from models.sequence_inputs import sequence_targets, teacher_forcing_features
from models.videoar import VideoAR
from parallel.collectives import all_reduce, data_parallel_group
from parallel.grad_buckets import DEFAULT_BUCKET_ELEMS, GradBuckets
from parallel.launch import run_local
from parallel.topology import init_topology
from trainer.step_metrics import clock

D, FRAMES, SCALES, BATCH = 16, 3, [1, 2, 4, 8], 2


def _worker(rank, world, depth, width, repeats, bucket_elems, out):
    init_topology(ParallelConfig())
    torch.manual_seed(0)
    cfg = VideoARConfig(preset="custom", depth=depth, width=width, heads=8, cond="class", num_classes=10)
    model = VideoAR(cfg, D).train()
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=SCALES))
    layout = model.layout_for(FRAMES, q.sizes)
    g = torch.Generator().manual_seed(rank)
    bits = [torch.rand(BATCH, FRAMES, D, h, w, generator=g) > 0.5 for h, w in q.sizes]
    features, targets = teacher_forcing_features(q, bits), sequence_targets(bits).float()
    cond = torch.zeros(BATCH, dtype=torch.long)
    params = list(model.parameters())
    buckets = GradBuckets(params, data_parallel_group(), world, bucket_elems)
    group = data_parallel_group()

    def backward(overlap: bool) -> None:
        model.zero_grad(set_to_none=True)
        if overlap:
            buckets.arm()
        logits = model(cond, features, layout)
        torch.nn.functional.binary_cross_entropy_with_logits(logits[..., 1] - logits[..., 0], targets).backward()

    def per_param() -> None:
        backward(False)
        for p in params:
            if p.grad is not None:
                all_reduce(p.grad, group)
                p.grad.div_(world)

    def bucketed() -> None:
        backward(False)
        buckets.reduce()

    def overlapped() -> None:
        backward(True)
        buckets.reduce()

    results = {}
    for name, fn in (("backward only", lambda: backward(False)), ("per parameter", per_param),
                     ("buckets", bucketed), ("buckets, overlapped", overlapped)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = clock(torch.device("cpu"))
            fn()
            times.append(clock(torch.device("cpu")) - t0)
        results[name] = statistics.median(times)
    if rank == 0:
        torch.save({"results": results, "params": len(params), "numel": sum(p.numel() for p in params),
                    "buckets": len(buckets.buckets)}, f"{out}/grad_reduce.pt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-elems", type=int, default=DEFAULT_BUCKET_ELEMS, help="elements per bucket")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_local(2, _worker, args.depth, args.width, args.repeats, args.bucket_elems, tmp)
        got = torch.load(Path(tmp) / "grad_reduce.pt", weights_only=True)
    r = got["results"]
    print(f"VideoAR depth {args.depth} width {args.width}: {got['params']} parameter tensors, "
          f"{got['numel'] / 1e6:.1f}M elements, {got['buckets']} bucket(s); dp = 2 on gloo, median of {args.repeats}")
    base = r["backward only"]
    for name, t in r.items():
        print(f"{name:22s} {t * 1e3:8.1f} ms   reduction cost {(t - base) * 1e3:7.1f} ms")
    cost = {k: r[k] - base for k in r if k != "backward only"}
    print(f"reduction time, buckets / per parameter: {cost['buckets'] / cost['per parameter']:.2f}; "
          f"overlapped / per parameter: {cost['buckets, overlapped'] / cost['per parameter']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
