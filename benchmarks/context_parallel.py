"""Context parallelism (parallel/cp.py): per-rank peak activation memory of one sample at cp = 1 vs cp = 2, and the
all-to-all bytes per layer counted at the collective against the formula, measured side by side in one run.

    python -m benchmarks.context_parallel [--frames 15] [--width 256] [--heads 8] [--depth 4] [--attention flex]

The sample is a VideoAR sequence (16-token text prefix, per latent frame the scales 1,2,3,4,6,8,12,16 = 530
tokens). cp = 1 is one process; cp = 2 two gloo processes (one thread each; cp = 1 gets one thread too). Each
measures the resident memory a thread samples every millisecond over forward + backward, beyond the model and
inputs (`act MB`: what the sample's activations cost that rank). The all-to-all bytes are what leaves a rank in
the forward, counted at the collective: per layer 4 exchanges (q, k, v in, the output back), each of a tensor of
B x H x (L / cp) x head_dim x 4 bytes of which (cp - 1) / cp goes to other ranks; the backward's reverse
exchanges move as much again.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

SCALES = tuple((s, s) for s in (1, 2, 3, 4, 6, 8, 12, 16))


def _model(args):
    from common.model_config import VideoARConfig
    from models.videoar import VideoAR
    cfg = VideoARConfig(preset="custom", depth=args.depth, width=args.width, heads=args.heads, cond="text",
                        text_len=16, text_dim=32, attention=args.attention)
    torch.manual_seed(0)
    return VideoAR(cfg, 16)


class _Peak:
    """Peak resident set over a code block, sampled by a thread every millisecond."""

    def __enter__(self):
        import psutil
        self.proc, self.done = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        return self

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def _step(model, layout, args) -> None:
    from models.objective import bit_loss
    n_video = layout.length - layout.prefix_len
    feats, cond = torch.randn(1, n_video, 16), torch.randn(1, 16, 32)
    targets = torch.zeros(1, n_video, 16, dtype=torch.bool)
    video = slice(0, n_video)
    if model.sequence_slice is not None:
        from parallel.cp import local_video_slice
        video = local_video_slice(layout.prefix_len, layout.length, args.cp_now, args.rank_now)
    bit_loss(model(cond, feats, layout), targets[:, video])[0].backward()


def _measure(model, args) -> float:
    layout = model.layout_for(args.frames, SCALES)
    _step(model, layout, args)  # warm-up: allocator pools, lazy tables
    model.zero_grad(set_to_none=False)
    with _Peak() as peak:
        _step(model, layout, args)
    return peak.mb


def _cp_rank(rank, world, args, out):
    from common.job_config import ParallelConfig
    import parallel.cp as cp_mod
    from parallel.collectives import group_rank, new_group
    from parallel.topology import init_topology
    init_topology(ParallelConfig())
    group = new_group(list(range(world)))
    model = _model(args)
    layout = model.layout_for(args.frames, SCALES)
    cp_mod.apply_context_parallel(model, model.parallel_plan(), world, group_rank(group), group, layout.length)
    sent = []
    exchange = cp_mod.all_to_all

    def counting(tensor, grp):  # bytes this rank sends to others, counted at the collective
        sent.append(tensor.numel() * tensor.element_size() * (world - 1) / world)
        return exchange(tensor, grp)

    cp_mod.all_to_all = counting
    args.cp_now, args.rank_now = world, rank
    mb = _measure(model, args)
    per_step = sum(sent) / 2  # warm-up + measured step; forward exchanges (backward's run inside autograd)
    torch.save({"mb": mb, "bytes_per_layer": per_step / args.depth, "calls_per_layer": len(sent) / 2 / args.depth},
               f"{out}/rank{rank}.pt")


def _single(rank, world, args, out):
    torch.save({"mb": _measure(_model(args), args)}, f"{out}/single.pt")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=15, help="latent frames (15 x 530 + 16 = 7,966 tokens)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--attention", choices=["sdpa", "flex"], default="flex")
    args = ap.parse_args(argv)
    from parallel.launch import run_local
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))  # (children) freed buffers return to the OS
    length = _model(args).layout_for(args.frames, SCALES).length
    with tempfile.TemporaryDirectory() as tmp:
        run_local(1, _single, args, tmp)
        single = torch.load(Path(tmp) / "single.pt", weights_only=True)["mb"]
        run_local(2, _cp_rank, args, tmp)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    hd = args.width // args.heads
    formula = 4 * 1 * args.heads * (length // 2) * hd * 4 * (2 - 1) / 2  # forward; backward moves as much again
    print(f"one sample of {length} tokens, VideoAR {args.depth} x {args.width} ({args.heads} heads), "
          f"attention={args.attention}, forward + backward")
    print(f"{'':>10} | {'act MB':>8} | {'vs cp=1':>7} | {'a2a MB/layer':>12} | {'formula':>8} | calls/layer")
    print(f"{'cp=1':>10} | {single:>8.1f} | {1.0:>6.2f}x | {'-':>12} | {'-':>8} | -")
    for r, res in enumerate(ranks):
        print(f"{f'cp=2 r{r}':>10} | {res['mb']:>8.1f} | {res['mb'] / single:>6.2f}x | "
              f"{res['bytes_per_layer'] / 2**20:>12.2f} | {formula / 2**20:>8.2f} | {res['calls_per_layer']:.0f}")
    print("target: per-rank activation memory at cp=2 <= 0.6x cp=1. a2a = bytes a rank sends per layer in the "
          "forward, counted at the collective; formula = 4 exchanges x B H (L/cp) hd x 4 B x (cp-1)/cp; the "
          "backward's reverse exchanges move as much again")


if __name__ == "__main__":
    main()
