"""Data pipeline throughput, measured side by side in one run:

(i)  preprocessing clips/s with 2 Ray encoder workers / 1 worker (same synthetic videos, local output;
     clips over the time after the Ray runtime and the workers are up, start-up printed apart). Each worker
     decodes, encodes and writes the shards of its inputs; printed per run: the workers' busy share of the
     time (decode / encode / write) and the driver's CPU seconds, i.e. where the time goes;
(ii) loader samples/s (ranged reads + decode, 4 threads, next batch prefetched) / the tiny trainer's
     consumption rate (samples/s of `trainer.train_videoar` on the same shards): > 1 means the loader keeps up.

    python -m benchmarks.data_pipeline [--videos 192] [--steps 20]

192 videos keep each worker busy for ~14-23 s: with 48 the rate window after start-up was 4-6 s, and the tail
(one worker idle while the other finishes its last video) took the workers' busy share from ~90% to ~71%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


TOKENIZER_8X = ["data.resolution=[64,64]", "tokenizer.spatial_compression=8", "tokenizer.channel_mult=[1,2,4]",
                "quantizer.scales=[1,2,4,8]"]  # the demo's tokenizer is 4x: this benchmark keeps its 64x64 clips


def preprocess_speedup(base: list[str], tmp: Path) -> None:
    """(i): the same inputs preprocessed with 1 worker, then 2, into separate outputs."""
    from common.config import load_config
    from data_pipeline.preprocess import preprocess

    rates, load0 = {}, os.getloadavg()[0]
    for workers in (1, 2):
        c = load_config("configs/demo.yaml", base + [f"preprocess.output={tmp / f'shards{workers}'}",
                                                     f"preprocess.workers={workers}"])
        cpu0 = time.process_time()
        s = preprocess(c, progress=False)
        driver_cpu, work = time.process_time() - cpu0, s.seconds - s.startup_seconds
        rates[workers] = s.clips / work
        busy = s.worker_seconds
        print(f"preprocess, {workers} worker(s): {s.clips} clips from {s.inputs} videos in {s.seconds:.1f} s "
              f"({s.startup_seconds:.1f} s start-up) = {rates[workers]:.2f} clips/s after start-up; workers busy "
              f"{sum(busy.values()) / (workers * work):.0%} of {workers} x {work:.1f} s (decode "
              f"{busy['decode']:.1f} s, encode {busy['encode']:.1f} s, write {busy['write']:.1f} s); "
              f"driver CPU {driver_cpu:.1f} s")
    print(f"(i)  preprocessing speed-up, 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x "
          f"({os.cpu_count()} cores, 1-min load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after: the Ray driver and Ray's own "
          f"processes share them with the workers)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--videos", type=int, default=192, help="synthetic 33-frame videos to preprocess")
    parser.add_argument("--steps", type=int, default=20, help="trainer and loader steps timed")
    args = parser.parse_args(argv)

    from data_pipeline.loader import ShardSet, rank_samples
    from data_pipeline.synth import generate_clips
    from models.tokenizer import VideoTokenizer
    from common.config import load_config
    from data_pipeline.tokenizer_ckpt import save_tokenizer
    from trainer.train_videoar import VideoARTrainer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        specs = generate_clips(tmp / "clips", args.videos, frames=33, size=64, fps=8, seed=0, progress=False)
        for i, s in enumerate(specs):  # class ids, so no text encoder start-up skews the timing
            meta = json.loads(s.json_path.read_text())
            s.json_path.write_text(json.dumps({**meta, "class": i % 4}))
        stage = ("curriculum=[{name: s, until_step: 1000, resolution: [64, 64], frames: 9, scales: [1, 2, 4, 8], "
                 "global_batch: 8, micro_batch: 8}]")
        base = ["videoar.cond=class", "videoar.num_classes=4", f"run.dir={tmp / 'run'}", stage, *TOKENIZER_8X,
                f"videoar_train.tokenizer_ckpt={tmp / 'tok'}", f"preprocess.input={tmp / 'clips'}",
                "preprocess.shard_bytes=1000000"]
        cfg = load_config("configs/demo.yaml", base)
        torch.manual_seed(0)
        save_tokenizer(VideoTokenizer(cfg.tokenizer, cfg.quantizer), cfg, tmp / "tok", 0)

        preprocess_speedup(base, tmp)

        shards = str(tmp / "shards1")
        data = ShardSet(shards, "64x64x9", workers=4)
        n, gb = len(data), 8
        t0 = time.perf_counter()
        for step in range(args.steps):
            data.batch(rank_samples(n, 0, step * gb, gb, 0, 1))
            data.prefetch(rank_samples(n, 0, (step + 1) * gb, gb, 0, 1))
        loader_rate = args.steps * gb / (time.perf_counter() - t0)

        trainer = VideoARTrainer(load_config("configs/demo.yaml", base + [f"data.shards={shards}", "videoar_train.eval_every=0"]), progress=False)
        trainer.train(max_steps=2)  # warm-up (first step builds caches)
        t0 = time.perf_counter()
        trainer.train(max_steps=2 + args.steps)
        train_rate = args.steps * gb / (time.perf_counter() - t0)
        print(f"loader: {loader_rate:.0f} samples/s ({n} samples, {data.bytes_read / 2**20:.1f} MB read); "
              f"tiny trainer consumes {train_rate:.1f} samples/s")
        print(f"(ii) loader / trainer consumption: {loader_rate / train_rate:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
