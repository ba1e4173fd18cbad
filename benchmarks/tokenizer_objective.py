"""Tokenizer objective arms side by side: scratch vs inflated-from-2D initialisation, without vs with the GAN term.

    python -m benchmarks.tokenizer_objective [--steps 300] [--quick] [--out runs/tokenizer_objective]
        [--clips 64 --heldout 16] [--gan-weight 0.1 --gan-start STEP] [key.sub=value ...]

One run, one set of synthetic `easy`-world clips (data_pipeline/synth.py), the demo's tokenizer (configs/demo.yaml:
32x32, f=4, tau=4, 9-frame windows) and the same seed and step budget for every arm. First a 2D image tokenizer
(tokenizer.time_kernel=1, temporal_compression=1, data.frames=1) trains on single frames for the same number of
steps; the `inflated` arms start from it (tokenizer_train.init_from, zero mode), and a `scratch, 2x steps` arm gets
their total budget (2D + 3D steps) from scratch. The GAN arms switch the causal 3D
discriminator (hinge + LeCAM, adaptive weight) on after --gan-start steps (default a third of the budget).
Prints one table of held-out PSNR / SSIM (the same held-out clips for every arm) and writes <out>/results.json.
One thread (torch.set_num_threads(1)): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from common.atomic import atomic_write_text
from common.config import load_config
from data_pipeline.synth import generate_clips
from trainer.train_tokenizer import train_tokenizer

TWO_D = ["tokenizer.time_kernel=1", "tokenizer.temporal_compression=1", "data.frames=1"]
ARMS = [  # name, init from the 2D tokenizer, GAN term, steps (x --steps)
    ("scratch", False, False, 1),
    ("scratch+gan", False, True, 1),
    ("inflated", True, False, 1),
    ("inflated+gan", True, True, 1),
    ("scratch, 2x steps", False, False, 2),  # the inflated arms' total budget (2D steps + 3D steps), from scratch
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML preset (default: configs/demo.yaml)")
    parser.add_argument("--out", default="runs/tokenizer_objective", help="clips, runs and results.json go here")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every arm and of the 2D tokenizer")
    parser.add_argument("--clips", type=int, default=64, help="synthetic clips (the last --heldout are held out)")
    parser.add_argument("--heldout", type=int, default=16, help="held-out clips every arm is evaluated on")
    parser.add_argument("--gan-weight", type=float, default=0.1, help="tokenizer_train.gan_weight of the GAN arms")
    parser.add_argument("--gan-start", type=int, default=None, help="tokenizer_train.gan_start_step (default "
                        "steps // 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 6 steps, 8 clips (2 held out)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.clips, args.heldout = 6, 8, 2
    if args.steps < 1 or args.clips <= args.heldout or args.heldout < 1:
        parser.error("need --steps >= 1 and --clips > --heldout >= 1")
    if args.gan_start is None:
        args.gan_start = args.steps // 3
    return args


def shared_overrides(args: argparse.Namespace, clips: Path) -> list[str]:
    return [f"data.clips_dir={clips}", f"data.heldout_clips={args.heldout}", "data.synth_world=easy",
            "run.tensorboard=false", "run.threads=1", *args.overrides]


def run_one(args: argparse.Namespace, name: str, overrides: list[str], steps: int) -> dict:
    budget = [f"tokenizer_train.steps={steps}", f"tokenizer_train.eval_every={steps}",
              f"tokenizer_train.ckpt_every={steps}", f"tokenizer_train.log_every={max(1, steps // 10)}"]
    run_dir = Path(args.out) / name.replace(", ", "_").replace(" ", "_")
    cfg = load_config(args.config, budget + overrides + [f"run.dir={run_dir}"])
    t0 = time.perf_counter()
    run = train_tokenizer(cfg, progress=False)
    seconds = time.perf_counter() - t0
    q = run.quality
    return {"arm": name, "steps": steps, "gain": getattr(cfg.quantizer, "gain", "?"), "psnr": q["psnr"],
            "ssim": q["ssim"], "psnr_start": run.psnr_start, "psnr_frame0": q.get("psnr_frame0"),
            "color_error": q.get("color_error"), "seconds": seconds, "checkpoint": str(run.checkpoint)}


def run_arms(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    clips = Path(args.out) / "clips"
    generate_clips(clips, args.clips, frames=17, size=32, fps=8, seed=0, progress=False, world="easy")
    shared = shared_overrides(args, clips)
    two_d = run_one(args, "tok2d", shared + TWO_D, args.steps)
    rows = []
    for name, inflated, gan, factor in ARMS:
        extra = [f"tokenizer_train.init_from={two_d['checkpoint']}"] if inflated else []
        if gan:
            extra += [f"tokenizer_train.gan_weight={args.gan_weight}",
                      f"tokenizer_train.gan_start_step={args.gan_start}"]
        rows.append(run_one(args, name, shared + extra, factor * args.steps))
        print(f"  {name}: held-out PSNR {rows[-1]['psnr']:.2f} dB, SSIM {rows[-1]['ssim']:.3f} "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    return two_d, rows


def table(args: argparse.Namespace, two_d: dict, rows: list[dict]) -> str:
    lines = [f"{args.steps} steps per arm unless said (and for the 2D tokenizer), {args.clips - args.heldout} "
             f"training clips, {args.heldout} held-out 9-frame clips, easy world 32x32; GAN weight {args.gan_weight} "
             f"(adaptive) after step {args.gan_start}; quantizer.gain={rows[0]['gain']}",
             "",
             "| arm | steps | held-out PSNR (dB) | SSIM | PSNR frame 0 | PSNR at step 0 | colour error | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        colour = f"{r['color_error']:.1f}" if r["color_error"] is not None else "–"
        lines.append(f"| {r['arm']} | {r['steps']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['psnr_frame0']:.2f} | "
                     f"{r['psnr_start']:.2f} | {colour} | {r['seconds']:.0f} |")
    lines.append(f"| (2D tokenizer, single frames) | {two_d['steps']} | {two_d['psnr']:.2f} | {two_d['ssim']:.3f} "
                 f"| – | {two_d['psnr_start']:.2f} | – | {two_d['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    two_d, rows = run_arms(args)
    text = table(args, two_d, rows)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    atomic_write_text(out / "results.json", json.dumps({"args": vars(args), "tok2d": two_d, "arms": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
