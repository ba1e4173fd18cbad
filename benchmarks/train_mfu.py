"""Achieved FLOP/s of a VideoAR train step vs this CPU's large-GEMM FLOP/s, measured side by side in one run.

    python -m benchmarks.train_mfu [--repeats 5] [--threads 2]

A train step is forward + backward + AdamW step in fp32 on teacher-forced random bits with the per-bit
cross-entropy of models/objective.py (depth 4, width 512, heads 8, class condition, 3 latent frames x scales
(1,2,4,8), batch 4, latent_dim 16). Its FLOPs come from trainer/flops.train_step_flops (the formula the
dashboards use for MFU); the "peak" is the measured FLOP/s of a 2048x2048 fp32 torch.mm on this CPU, so the
ratio says how much of the machine's practical GEMM throughput training gets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from models.quantizer import MultiScaleBitwiseQuantizer, QuantizerConfig
from models.sequence_inputs import sequence_targets, teacher_forcing_features
from models.videoar import VideoAR, VideoARConfig
from trainer.flops import train_step_flops

D, FRAMES, SCALES, BATCH, GEMM_N = 16, 3, [1, 2, 4, 8], 4, 2048


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed train steps / GEMMs (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = VideoARConfig(preset="custom", depth=4, width=512, heads=8, cond="class", num_classes=10)
    model = VideoAR(cfg, D).train()
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=SCALES))
    layout = model.layout_for(FRAMES, q.sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    bits = [torch.rand(BATCH, FRAMES, D, h, w, generator=g) > 0.5 for h, w in q.sizes]
    features, targets = teacher_forcing_features(q, bits), sequence_targets(bits)  # data, outside the timing
    cond = torch.randint(0, cfg.num_classes, (BATCH,), generator=g)

    def step() -> None:
        logits = model(cond, features, layout)
        loss = F.cross_entropy(logits.reshape(-1, 2), targets.reshape(-1).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    load = os.getloadavg()[0]
    t_step = median_seconds(step, args.repeats, warmup=2)
    t_gemm = median_seconds(lambda: torch.mm(a, b), max(args.repeats, 5))
    flops = train_step_flops(cfg, D, layout, BATCH)
    achieved, peak = flops / t_step, 2 * GEMM_N**3 / t_gemm
    params = sum(p.numel() for p in model.parameters())

    print(f"model: depth 4, width 512, heads 8, class cond, {params / 1e6:.1f}M params; {FRAMES} frames x scales "
          f"{SCALES} -> L = {layout.length} tokens, batch {BATCH}, fp32; {args.threads} threads, median of "
          f"{args.repeats}; load average before the run {load:.2f}")
    print(f"train step (forward + backward + AdamW): {t_step * 1e3:.1f} ms, {flops / 1e9:.2f} GFLOP (3 x forward)")
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s")
    print(f"{GEMM_N}x{GEMM_N} fp32 torch.mm: {t_gemm * 1e3:.1f} ms, {peak / 1e9:.1f} GFLOP/s")
    print(f"MFU vs this CPU's GEMM peak: {achieved / peak:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
