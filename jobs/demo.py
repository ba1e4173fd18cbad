"""The main job on embedded defaults, end to end on one CPU machine.

    python -m jobs.demo --config configs/demo.yaml [key.sub=value ...]      (what `make demo` runs)

Steps: (1) generate deterministic synthetic H.264 clips with captions into data.clips_dir (skipped when they
exist), (2) train the 3D multi-scale bitwise tokenizer and write held-out reconstructions, (3) pretrain a tiny
VideoAR over the curriculum's stages on the tokenizer's latents (resumes if interrupted), (4) sample videos from
held-out captions and one image-to-video continuation, written as .mp4 and a contact-sheet PNG.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from data_pipeline.clips import read_caption
from data_pipeline.synth import generate_clips
from trainer.config import config_arg_parser, config_from_args
from trainer.sample import sample_to_files
from trainer.train_tokenizer import train_tokenizer
from trainer.train_videoar import out_dir, train_videoar


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    cfg = config_from_args(parser.parse_args(argv), parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    d = cfg.data
    print(f"[1/4] synthetic clips -> {d.clips_dir}", flush=True)
    generate_clips(d.clips_dir, d.synth_clips, frames=d.synth_frames, size=tuple(d.resolution), fps=d.fps,
                           seed=cfg.run.seed)
    print(f"[2/4] tokenizer training ({cfg.tokenizer_train.steps} steps) -> {cfg.run_dir / 'tokenizer'}", flush=True)
    tok = train_tokenizer(cfg)
    stages = ", ".join(f"{s.name} (to step {s.until_step}, {s.resolution[0]}x{s.resolution[1]}, {s.frames} frames)"
                       for s in cfg.curriculum)
    print(f"[3/4] VideoAR pretraining: {stages} -> {out_dir(cfg)}", flush=True)
    run = train_videoar(cfg)
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    last = records[-1] if records else {}
    held = sorted(Path(d.clips_dir).glob("*.mp4"))[-d.heldout_clips:]  # the clips training held out
    prompts = [read_caption(p) for p in held]
    samples_dir = cfg.run_dir / "samples"
    print(f"[4/4] sampling {len(prompts)} held-out captions + 1 image-to-video -> {samples_dir}", flush=True)
    ckpts = out_dir(cfg) / "checkpoints"
    if cfg.videoar.cond == "text":
        t2v = sample_to_files(ckpts, samples_dir / "text-to-video", prompts=prompts, seed=cfg.run.seed)
        i2v = sample_to_files(ckpts, samples_dir / "image-to-video", prompts=prompts[:1], init=held[0], init_frames=1,
                              seed=cfg.run.seed)
    else:
        t2v = sample_to_files(ckpts, samples_dir / "class-to-video", class_ids=[0, 1], seed=cfg.run.seed)
        i2v = sample_to_files(ckpts, samples_dir / "image-to-video", class_ids=[0], init=held[0], seed=cfg.run.seed)
    print(f"\nDone in {time.time() - t0:.0f} s.\n"
          f"  tokenizer held-out PSNR: {tok.psnr_start:.2f} dB at step 0 -> {tok.psnr_end:.2f} dB "
          f"({tok.recon_png})\n"
          f"  VideoAR: step {run.step}, bit loss {math.log(2):.3f} (chance) -> {last.get('loss', float('nan')):.3f}, "
          f"bit accuracy {last.get('bit_acc', float('nan')):.3f}, stage {last.get('stage')}\n"
          f"  checkpoints:             {ckpts}/ (latest: {(ckpts / 'latest').read_text().strip()})\n"
          f"  text-to-video samples:   {t2v.contact_sheet} and {len(t2v.videos)} .mp4 "
          f"({t2v.forwards} transformer forwards each batch)\n"
          f"  image-to-video sample:   {i2v.videos[0]} (first frame from {held[0].name})\n"
          f"  captions:                {prompts}\n"
          f"  metrics:                 {cfg.run_dir / 'tokenizer' / 'metrics.jsonl'}, {run.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
