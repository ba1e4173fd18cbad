"""The main job on embedded defaults, end to end on one CPU machine.

    python -m jobs.demo --config configs/demo.yaml [key.sub=value ...]      (what `make demo` runs)

Steps: (1) generate deterministic synthetic H.264 clips with captions into data.clips_dir (skipped when they
exist), (2) train the 3D multi-scale bitwise tokenizer, (3) write held-out reconstructions and print where
everything is. Later stages (pre-tokenized shards, VideoAR pretraining, sampling) extend this job.
"""

from __future__ import annotations

import logging
import sys
import time

from data_pipeline.synth import generate_clips
from trainer.config import config_arg_parser, config_from_args
from trainer.train_tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    cfg = config_from_args(parser.parse_args(argv), parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    d = cfg.data
    print(f"[1/2] synthetic clips -> {d.clips_dir}", flush=True)
    generate_clips(d.clips_dir, d.synth_clips, frames=d.synth_frames, size=tuple(d.resolution), fps=d.fps,
                   seed=cfg.run.seed)
    print(f"[2/2] tokenizer training ({cfg.tokenizer_train.steps} steps) -> {cfg.run_dir / 'tokenizer'}", flush=True)
    run = train_tokenizer(cfg)
    print(f"\nDone in {time.time() - t0:.0f} s.\n"
          f"  held-out PSNR:      {run.psnr_start:.2f} dB at step 0 -> {run.psnr_end:.2f} dB\n"
          f"  tokenizer:          {run.checkpoint}/ (model.safetensors + config.json)\n"
          f"  reconstructions:    {run.recon_png}\n"
          f"  side-by-side video: {', '.join(str(p) for p in run.recon_videos)}\n"
          f"  metrics:            {cfg.run_dir / 'tokenizer' / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
