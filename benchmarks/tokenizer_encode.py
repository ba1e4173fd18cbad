"""Chunked (streaming) vs whole-clip tokenizer encoding: speed and peak-memory ratios, measured in one run.

    python -m benchmarks.tokenizer_encode [--frames 65] [--size 128] [--chunk 8]

Each mode runs in its own subprocess so peak RSS is attributable. Chunked encoding is what preprocessing uses
for long videos: it must give the same latents (tested) with bounded memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _worker(mode: str, frames: int, size: int, chunk: int) -> None:
    import torch

    from models.quantizer import QuantizerConfig
    from models.tokenizer import TokenizerConfig, VideoTokenizer

    torch.manual_seed(0)
    tok = VideoTokenizer(TokenizerConfig(), QuantizerConfig(scales=[1, 2, 4, size // 8])).eval()
    x = torch.rand(1, 3, frames, size, size) * 2 - 1
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        t0 = time.perf_counter()
        z = tok.encode_latent(x, chunk_frames=chunk if mode == "chunked" else None)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "extra_rss_mb": (peak - base) / 1024, "latent_frames": z.shape[2]}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=65)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--worker", choices=["whole", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.frames, args.size, args.chunk)
        return 0
    results = {}
    for mode in ("whole", "chunked"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.tokenizer_encode", "--worker", mode,
                              f"--frames={args.frames}", f"--size={args.size}", f"--chunk={args.chunk}"],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    w, c = results["whole"], results["chunked"]
    print(f"clip: {args.frames} frames at {args.size}x{args.size}, chunks of {args.chunk} frames, demo tokenizer")
    print(f"whole:   {w['seconds']:.2f} s, peak extra RSS {w['extra_rss_mb']:.0f} MB")
    print(f"chunked: {c['seconds']:.2f} s, peak extra RSS {c['extra_rss_mb']:.0f} MB")
    print(f"ratio chunked/whole: time {c['seconds'] / w['seconds']:.2f}x, "
          f"peak memory {c['extra_rss_mb'] / max(w['extra_rss_mb'], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
