"""Train the 3D multi-scale bitwise tokenizer on a folder of clips.

    python -m trainer.train_tokenizer --config configs/demo.yaml [key.sub=value ...]

Writes under <run.dir>/tokenizer/: config.yaml (resolved), checkpoint/ (model.safetensors + config.json),
metrics.jsonl, recon/ (held-out originals next to reconstructions as .mp4, and a contact-sheet PNG).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_pipeline.clips import Clip, load_clip_folder, random_windows, split_heldout, to_model_input, to_uint8_frames
from data_pipeline.video_io import write_contact_sheet, write_video
from models.tokenizer import TokenizerOutput, VideoTokenizer
from common.config import Config, TokenizerTrainConfig, config_arg_parser, config_from_args, save_config
from common.metrics import JsonlLogger, psnr
from parallel.optim import param_groups, warmup_cosine
from data_pipeline.tokenizer_ckpt import save_tokenizer

log = logging.getLogger("train_tokenizer")


@dataclass
class TokenizerRun:
    psnr_start: float  # held-out PSNR (dB) of the quantized reconstruction before the first step
    psnr_end: float
    checkpoint: Path
    recon_png: Path
    recon_videos: list[Path]


def tokenizer_loss(out: TokenizerOutput, x: torch.Tensor, t: TokenizerTrainConfig) -> tuple[torch.Tensor, dict]:
    l1, l2 = F.l1_loss(out.recon, x), F.mse_loss(out.recon, x)
    loss = t.l1_weight * l1 + t.l2_weight * l2 + t.commit_weight * out.quant.commit_loss \
        + t.entropy_weight * out.quant.entropy_loss
    parts = {"loss": loss.item(), "l1": l1.item(), "l2": l2.item(), "commit": out.quant.commit_loss.item(),
             "entropy": out.quant.entropy_loss.item()}
    return loss, parts


@torch.no_grad()
def reconstruct(model: VideoTokenizer, x: torch.Tensor) -> torch.Tensor:
    """Quantized reconstruction in eval mode (the training mode is restored)."""
    was_training = model.training
    model.eval()
    recon = model(x).recon
    model.train(was_training)
    return recon


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

    clips = load_clip_folder(d.clips_dir, tuple(d.resolution), d.frames, progress=progress)
    train_clips, held = split_heldout(clips, d.heldout_clips, d.clips_dir)
    x_eval = eval_batch(held, d.frames).to(cfg.run.device)

    model = VideoTokenizer(cfg.tokenizer, cfg.quantizer).to(cfg.run.device)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, t.warmup_steps, t.steps))
    gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    metrics = JsonlLogger(out_dir / "metrics.jsonl", append=False)  # no resume yet: a rerun starts afresh

    psnr_start = psnr(reconstruct(model, x_eval), x_eval)
    metrics.log({"step": 0, "heldout_psnr": psnr_start})
    log.info("held-out PSNR at step 0: %.2f dB", psnr_start)
    # in a log file (not a terminal) redraw rarely, so logs stay readable
    bar = tqdm(range(1, t.steps + 1), desc="tokenizer", unit="step", disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 20.0)
    for step in bar:
        x = random_windows(train_clips, d.frames, t.batch_size, gen).to(cfg.run.device)
        loss, parts = tokenizer_loss(model(x), x, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{parts['loss']:.4f}", l1=f"{parts['l1']:.4f}", refresh=False)
        if step % t.log_every == 0:
            metrics.log({"step": step, "lr": sched.get_last_lr()[0], **parts})
        if step % t.eval_every == 0 or step == t.steps:
            recon = reconstruct(model, x_eval)  # the last step always evaluates: its recon is written below
            psnr_end = psnr(recon, x_eval)
            metrics.log({"step": step, "heldout_psnr": psnr_end})
            bar.write(f"step {step}: held-out PSNR {psnr_end:.2f} dB (step 0: {psnr_start:.2f} dB)")
        if step % t.ckpt_every == 0 or step == t.steps:
            save_tokenizer(model, cfg, out_dir / "checkpoint", step)
    png, videos = write_reconstructions(x_eval, recon, out_dir / "recon", d.fps)
    metrics.close()
    return TokenizerRun(psnr_start, psnr_end, out_dir / "checkpoint", png, videos)


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    cfg = config_from_args(parser.parse_args(argv), parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = train_tokenizer(cfg)
    print(f"held-out PSNR {run.psnr_start:.2f} dB -> {run.psnr_end:.2f} dB\n"
          f"checkpoint: {run.checkpoint}\nreconstructions: {run.recon_png} and {len(run.recon_videos)} .mp4 in "
          f"{run.recon_png.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
