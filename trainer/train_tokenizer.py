"""Train the 3D multi-scale bitwise tokenizer on a folder of clips.

    python -m trainer.train_tokenizer --config configs/demo.yaml [key.sub=value ...]

Writes under <run.dir>/tokenizer/: config.yaml (resolved), checkpoint/ (model.safetensors + config.json),
metrics.jsonl + tensorboard/ (loss; held-out PSNR, SSIM, PSNR from the first k scales, object colour error:
trainer/tokenizer_eval.py; the reconstructions as an image), recon/ (held-out originals next to reconstructions
as .mp4, and a contact-sheet PNG).

The objective is paper Eq. 4 (models/tokenizer_losses.py): l1 + l2 + commitment + entropy, plus, when their weights
are > 0, a perceptual feature distance (`tokenizer_train.perceptual_weight`, a TorchScript network you supply in
`perceptual_net`) and a hinge GAN with LeCAM against a causal 3D discriminator (`gan_weight`, switched on after
`gan_start_step`, its own AdamW at `disc_lr`; logged: d_loss, g_loss, lecam, gan_weight_eff; its weights in
<run.dir>/tokenizer/discriminator.safetensors). trainer/tokenizer_gan.py wires them in.

Inflation from a 2D image tokenizer: train one on single frames, then start the 3D one from it:

    python -m trainer.train_tokenizer --config configs/demo.yaml run.dir=runs/tok2d \
        tokenizer.time_kernel=1 tokenizer.temporal_compression=1 data.frames=1
    python -m trainer.train_tokenizer --config configs/demo.yaml \
        tokenizer_train.init_from=runs/tok2d/tokenizer/checkpoint [tokenizer_train.init_mode=zero|random]

(trainer/tokenizer_init.py: the 2D kernels go into the temporally last slice; with `zero` the step-0 3D
tokenizer reconstructs each clip's first frame exactly as the 2D one does.)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.clips import Clip, load_clip_folder, random_windows, split_heldout, to_model_input, to_uint8_frames
from data_pipeline.video_io import write_contact_sheet, write_video
from models.tokenizer import TokenizerOutput, VideoTokenizer
from models.tokenizer_losses import TokenizerObjective
from common.config import Config, TokenizerTrainConfig, config_arg_parser, config_from_args, save_config
from common.metrics import MetricSinks, psnr
from common.precision import autocast
from parallel.optim import param_groups, warmup_cosine
from data_pipeline.tokenizer_ckpt import save_tokenizer
from trainer.tokenizer_eval import tokenizer_quality
from trainer.tokenizer_gan import TokenizerGan
from trainer.tokenizer_init import init_from_2d

log = logging.getLogger("train_tokenizer")


@dataclass
class TokenizerRun:
    psnr_start: float  # held-out PSNR (dB) of the quantized reconstruction before the first step
    psnr_end: float
    quality: dict[str, float]  # the last held-out evaluation (trainer/tokenizer_eval.py)
    checkpoint: Path
    recon_png: Path
    recon_videos: list[Path]


def tokenizer_loss(out: TokenizerOutput, x: torch.Tensor, t: TokenizerTrainConfig) -> tuple[torch.Tensor, dict]:
    """l1 + l2 + commitment + entropy (Eq. 4 without its optional terms), with the logged parts."""
    return TokenizerObjective(t).generator_loss(out, x)


def train_step(model: VideoTokenizer, gan: TokenizerGan, opt: torch.optim.Optimizer, x: torch.Tensor, step: int,
               t: TokenizerTrainConfig) -> dict[str, float]:
    """One tokenizer step (then, once the GAN is on, one discriminator step); the logged parts. With a bf16
    `tokenizer_train.precision` the encoder and decoder run under autocast (the quantizer and losses in fp32)."""
    with autocast(t.precision, x.device):
        out = model(x, t.scale_dropout)
    loss, parts = gan.generator_loss(out, x, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip:
        parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
    opt.step()
    parts.update(gan.discriminator_step(x, out.recon.detach(), step))
    return parts


def eval_batch(clips: list[Clip], frames: int) -> torch.Tensor:
    return to_model_input(np.stack([c.frames[:frames] for c in clips]))


def write_reconstructions(x: torch.Tensor, recon: torch.Tensor, out_dir: Path, fps: float) -> tuple[Path, list[Path]]:
    """Original | reconstruction side by side per held-out clip (.mp4), and one contact sheet of all of them."""
    orig, rec = to_uint8_frames(x), to_uint8_frames(recon)
    videos, rows, labels = [], [], []
    for i, (o, r) in enumerate(zip(orig, rec)):
        path = out_dir / f"heldout-{i:02d}.mp4"
        write_video(path, np.concatenate([o, r], axis=2), fps=fps)
        videos.append(path)
        rows += [o, r]
        labels += [f"clip {i}", f"recon {psnr(x[i:i + 1], recon[i:i + 1]):.1f}dB"]
    png = out_dir / "reconstructions.png"
    write_contact_sheet(png, rows, labels=labels)
    return png, videos


def train_tokenizer(cfg: Config, progress: bool = True) -> TokenizerRun:
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    out_dir = cfg.run_dir / "tokenizer"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    t, d = cfg.tokenizer_train, cfg.data

    clips = load_clip_folder(d.clips_dir, tuple(d.resolution), d.frames, progress, d.class_folders)
    train_clips, held = split_heldout(clips, d.heldout_clips, d.clips_dir)
    x_eval = eval_batch(held, d.frames).to(cfg.run.device)

    model = VideoTokenizer(cfg.tokenizer, cfg.quantizer).to(cfg.run.device)
    init_step = init_from_2d(model, cfg)
    if init_step is not None:
        log.info("inflated the 2D tokenizer %s (step %d, %s mode)", t.init_from, init_step, t.init_mode)
    gan = TokenizerGan(t, model, cfg.run.device, cfg.run.seed)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, t.warmup_steps, t.steps))
    gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    # no resume yet: a rerun starts afresh
    metrics = MetricSinks(out_dir, "tokenizer", tensorboard=cfg.run.tensorboard, prometheus_port=-1)
    captions = [c.caption for c in held]

    def evaluate(step: int) -> tuple[dict[str, float], torch.Tensor]:
        quality, recon = tokenizer_quality(model, x_eval, captions)
        metrics.log({"step": step, "heldout_psnr": quality["psnr"], **{f"heldout/{k}": v for k, v in quality.items()}})
        return quality, recon

    psnr_start = evaluate(0)[0]["psnr"]
    log.info("held-out PSNR at step 0: %.2f dB", psnr_start)
    # in a log file (not a terminal) redraw rarely, so logs stay readable
    bar = tqdm(range(1, t.steps + 1), desc="tokenizer", unit="step", disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 20.0)
    for step in bar:
        x = random_windows(train_clips, d.frames, t.batch_size, gen).to(cfg.run.device)
        parts = train_step(model, gan, opt, x, step, t)
        sched.step()
        bar.set_postfix(loss=f"{parts['loss']:.4f}", l1=f"{parts['l1']:.4f}", refresh=False)
        if step % t.log_every == 0:
            metrics.log({"step": step, "lr": sched.get_last_lr()[0], **parts})
        if step % t.eval_every == 0 or step == t.steps:
            quality, recon = evaluate(step)  # the last step always evaluates: its recon is written below
            bar.write(f"step {step}: held-out {describe_quality(quality)} (PSNR at step 0: {psnr_start:.2f} dB)")
        if step % t.ckpt_every == 0 or step == t.steps:
            save_tokenizer(model, cfg, out_dir / "checkpoint", step)
            gan.save(out_dir, step)
    png, videos = write_reconstructions(x_eval, recon, out_dir / "recon", d.fps)
    metrics.log_image("heldout/reconstructions", png, t.steps)
    metrics.close()
    return TokenizerRun(psnr_start, quality["psnr"], quality, out_dir / "checkpoint", png, videos)


def describe_quality(q: dict[str, float]) -> str:
    """'PSNR 27.1 dB (by scales: 14.2, 18.0, 23.5, 27.1), SSIM 0.912, object colour error 9.3'"""
    scales = ", ".join(f"{q[k]:.1f}" for k in sorted((k for k in q if k.startswith("psnr_scales")),
                                                       key=lambda k: int(k[len("psnr_scales"):])))
    text = f"PSNR {q['psnr']:.2f} dB (by scales used: {scales}), SSIM {q['ssim']:.3f}"
    text += f", object colour error {q['color_error']:.1f}/255" if "color_error" in q else ""
    if "caption_color" in q:  # what a sampled video can score at best through this tokenizer
        text += (f"; reconstructions vs captions: colour {q['caption_color']:.2f}, shape {q['caption_shape']:.2f}, "
                 f"direction {q['caption_direction']:.2f}, object in >= 90% of frames {q['caption_present_90']:.2f}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    cfg = config_from_args(parser.parse_args(argv), parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = train_tokenizer(cfg)
    print(f"held-out PSNR {run.psnr_start:.2f} dB -> {run.psnr_end:.2f} dB; {describe_quality(run.quality)}\n"
          f"checkpoint: {run.checkpoint}\nreconstructions: {run.recon_png} and {len(run.recon_videos)} .mp4 in "
          f"{run.recon_png.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
