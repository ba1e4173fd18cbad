"""One attention layer on long VideoAR sequences: dense-mask SDPA (the reference) vs block-sparse flex attention
(models/block_sparse.py), peak memory and time measured side by side in one run (issue 17).

    python -m benchmarks.attention_memory [--lengths 2048 8192 16384] [--sparse-only 32768] [--heads 4]
                                          [--head-dim 64] [--kernels tiled flex] [--backward]

The sequences are VideoAR layouts (16-token text prefix; per latent frame the scales 1,2,3,4,6,8,12,16 of a 16x16
grid = 530 tokens; as many frames as reach the length). Each case runs in a fresh process (glibc's mmap threshold
fixed, so freed buffers return to the OS): inputs are allocated, the mask is built (dense: the L x L bool tensor;
sparse: the tile structure and BlockMask), one warm-up call (flex compiles in it), three timed calls (the best counts), then a call while a
thread samples the resident set every millisecond. `extra MB` = the peak over the call + the mask, beyond the
inputs and outputs. Sparse kernels: `tiled` (the CPU default: SDPA per query tile over its computed key tiles)
and `flex` (compiled flex_attention, CUDA's default). Forward only by default (`--backward`: forward + backward;
on CPU every sparse backward is the tiled one, flex has none).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROBE = r"""
import json, sys, threading, time
import psutil, torch
import torch.nn.functional as F
from models.attention_mask import block_causal_mask
from models.block_sparse import attend, block_mask, visible_fraction
from models.layout import SequenceLayout
torch.manual_seed(0)
kind, frames, heads, hd, backward = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5] == "1"
layout = SequenceLayout(16, frames, tuple((s, s) for s in (1, 2, 3, 4, 6, 8, 12, 16)))
L = layout.length
proc = psutil.Process()
q, k, v = (torch.randn(1, heads, L, hd, requires_grad=backward) for _ in range(3))
base = proc.memory_info().rss
t0 = time.perf_counter()
if kind == "dense":
    mask, frac = block_causal_mask(layout)[None, None], 1.0
    run = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
else:
    mask = block_mask(layout, 1)
    frac = visible_fraction(mask)
    run = lambda: attend(q, k, v, mask, kind)
mask_s = time.perf_counter() - t0
def call():
    out = run()
    if backward:
        out.sum().backward()
        q.grad = k.grad = v.grad = None
    return out
call()  # warm-up (flex compiles here)
seconds = float("inf")
for _ in range(3):  # timed alone (no sampler thread), best of 3
    t0 = time.perf_counter(); call(); seconds = min(seconds, time.perf_counter() - t0)
peak, done = [proc.memory_info().rss], threading.Event()
def sample():
    while not done.is_set():
        peak.append(proc.memory_info().rss)
        time.sleep(0.001)
t = threading.Thread(target=sample); t.start()
out = call()
done.set(); t.join()
extra = max(peak) - base - out.numel() * 4
print(json.dumps({"L": L, "seconds": seconds, "extra_mb": extra / 2**20, "mask_s": mask_s, "tiles": frac}))
"""


def frames_for(length: int) -> int:
    return max(1, round((length - 16) / 530))


def measure(kind: str, length: int, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 20), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-c", PROBE, kind, str(frames_for(length)), str(args.heads), str(args.head_dim),
           "1" if args.backward else "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{kind} at L={length} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384], help="dense and sparse")
    ap.add_argument("--sparse-only", type=int, nargs="*", default=[32768], help="lengths for the sparse paths only")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--kernels", nargs="+", default=["tiled", "flex"], choices=["tiled", "flex", "flex_eager"],
                    help="sparse kernels (videoar.sparse_kernel): tiled = CPU default, flex = compiled flex_attention")
    ap.add_argument("--backward", action="store_true", help="forward + backward instead of forward only")
    args = ap.parse_args(argv)
    print(f"one attention layer, batch 1, {args.heads} heads x {args.head_dim}, "
          f"{'forward+backward' if args.backward else 'forward'}; extra MB / seconds per path; ratios vs dense")
    head = f"{'L':>6} {'tiles':>5} | {'dense':>14} |" + "".join(f" {k:>14} {'ratios':>12} |" for k in args.kernels)
    print(head)
    for length in args.lengths + args.sparse_only:
        dense = measure("dense", length, args) if length in args.lengths else None
        row = []
        for kernel in args.kernels:
            r = measure(kernel, length, args)
            ratios = (f"{dense['extra_mb'] / max(r['extra_mb'], 0.1):>5.1f}x {r['seconds'] / dense['seconds']:>5.2f}x"
                      if dense else f"{'-':>12}")
            row.append(f" {r['extra_mb']:>7.1f} {r['seconds']:>6.3f} {ratios} |")
        d = f"{dense['extra_mb']:>7.1f} {dense['seconds']:>6.3f}" if dense else f"{'-':>14}"
        print(f"{r['L']:>6} {r['tiles']:>5.2f} | {d} |" + "".join(row))
    print("tiles = share of 128x128 tiles computed; ratios = dense MB / path MB (target >= 8x at 16k) and path s / "
          "dense s (target <= 0.6x at 16k); mask build s is in the JSON of each probe")


if __name__ == "__main__":
    main()
