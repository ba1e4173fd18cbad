"""Sample videos from a VideoAR checkpoint: text (or class) to video, image to video, continuation.

    python -m trainer.sample --ckpt runs/demo/videoar/checkpoints --prompt "a red circle moving left" \
        [--prompt ...] [--init first.png|clip.mp4 --init-frames 1] [--cfg-scale 3 --cfg-schedule constant]
        [--temperature 1 --top-p 1 --seed 0] [--frames 33 | --extend 4 --extend-context 1] [--out runs/demo/samples]

Uses the newest committed checkpoint under --ckpt (or a step-XXXXXXXX directory), its config, and the frozen
tokenizer the run was trained with. Generates at the last curriculum stage's resolution and length (--stage to
pick another), honouring the stage's frame window (each frame sees the last `window` frames, and the KV cache holds
only those). Writes one .mp4 per sample and a contact-sheet PNG.

Longer videos, two ways: `--frames N` continues one sequence beyond the trained length (RoPE positions beyond
training; memory grows with N unless a window was trained); `--extend N` makes N shots of the trained length, each
started from the last `--extend-context` latent frames of the previous shot re-encoded through the causal tokenizer
(the paper's frame re-encoding, "V2V shot N"): N x the trained length at the trained length's memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data_pipeline.clips import to_model_input, to_uint8_frames
from data_pipeline.video_io import read_video, write_contact_sheet, write_video
from models.text_encoder import TextEncoder
from models.sampler import CFG_SCHEDULES, SamplingConfig, sample
from models.tokenizer import VideoTokenizer
from models.videoar import VideoAR
from parallel.checkpoint_format import full_model_state, read_consolidated, resolve_step_dir
from parallel.topology import rank_device
from common.atomic import atomic_write_text
from common.config import Config, config_from_dict
from trainer.curriculum import StageConfig
from trainer.video_metrics import caption_scores
from data_pipeline.tokenizer_ckpt import load_tokenizer

log = logging.getLogger("sample")


@dataclass
class Samples:
    videos: list[Path]
    contact_sheet: Path
    frames: np.ndarray  # uint8 (B, T, H, W, 3)
    forwards: int
    scores: list[dict | None]
    cache_bytes: int = 0  # the KV cache of one shot (bounded by the frame window when the stage trained one)  # per video: caption scores (trainer/video_metrics.py), None without a world caption


def load_videoar(ckpt: str | Path, device: str = "cpu") -> tuple[VideoAR, Config, int]:
    """(model in eval mode, run config, step) from a consolidated .safetensors file, a checkpoints root (newest
    committed step) or a step directory, whatever parallel layout saved it."""
    ckpt = Path(ckpt)
    if ckpt.is_file():
        config, state, step = read_consolidated(ckpt)
    else:
        meta, state = full_model_state(resolve_step_dir(ckpt))
        config, step = meta["config"], int(meta["step"])
    cfg = config_from_dict(config)
    model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{ckpt}: weights do not fit the model its config builds ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, step


def pick_stage(cfg: Config, name: str | None) -> StageConfig:
    if name is None:
        return cfg.curriculum[-1]
    for s in cfg.curriculum:
        if s.name == name:
            return s
    raise ValueError(f"no curriculum stage {name!r}; stages: {[s.name for s in cfg.curriculum]}")


def condition(model: VideoAR, prompts: list[str], class_ids: list[int]) -> torch.Tensor:
    c = model.cfg
    if c.cond == "class":
        if not class_ids or any(not 0 <= i < c.num_classes for i in class_ids):
            raise ValueError(f"this model is class-conditioned: pass --class-id in 0..{c.num_classes - 1}")
        return torch.tensor(class_ids, dtype=torch.long)
    if not prompts:
        raise ValueError("this model is text-conditioned: pass --prompt")
    return text_encoder(c.text_encoder, c.text_len).encode(prompts)


@lru_cache(maxsize=2)
def text_encoder(name: str, length: int) -> TextEncoder:
    """The frozen text encoder, loaded once per process: quality evaluation samples many times (each drift clip,
    every stage end) and reloading the weights each time cost more than the sampling."""
    return TextEncoder(name, length)


@torch.no_grad()
def encode_bits(tokenizer: VideoTokenizer, quantizer, video: torch.Tensor) -> list[torch.Tensor]:
    """Per-scale bits [(B, T0, d, h_k, w_k)] of pixel frames (B, 3, 1 + k * tau, H, W) in [-1, 1]."""
    b = video.shape[0]
    z = tokenizer.encode_latent(video.to(next(tokenizer.parameters()).device))  # (B, d, T0, h, w)
    bits = quantizer.encode(z.transpose(1, 2).flatten(0, 1))
    return [x.view(b, -1, *x.shape[1:]) for x in bits]


def given_bits(tokenizer: VideoTokenizer, quantizer, init: str | Path, init_frames: int, stage: StageConfig,
               batch: int) -> list[torch.Tensor]:
    """Bits of the first latent frames of an image or video (resized + center-cropped to the stage)."""
    frames = read_video(init, num_frames=init_frames, size=tuple(stage.resolution))
    if len(frames) < init_frames:
        raise ValueError(f"{init}: has {len(frames)} frames, --init-frames asks for {init_frames}")
    tokenizer.latent_frames(init_frames)  # 1 + k * tau
    bits = encode_bits(tokenizer, quantizer, to_model_input(frames))
    return [x.expand(batch, *x.shape[1:]) for x in bits]


def generate(model: VideoAR, cfg: Config, tokenizer: VideoTokenizer, cond: torch.Tensor, sampling: SamplingConfig,
             stage: StageConfig, init: str | Path | None = None, init_frames: int = 1, seed: int = 0,
             frames: int | None = None, extend: int = 1, extend_context: int = 1) -> tuple[torch.Tensor, int, int]:
    """Decoded videos (B, 3, T, H, W) in [-1, 1], the number of transformer forwards and the KV cache's bytes;
    `frames` video frames (1 + k * tau; default: the stage's), e.g. twice the trained length to see how a
    continuation drifts; `extend` shots of that length chained by re-encoding (see the module docstring)."""
    quantizer = tokenizer.quantizer.for_sizes(stage.sizes)
    num_latent = tokenizer.latent_frames(frames or stage.frames)
    if extend < 1 or not 1 <= extend_context < num_latent:
        raise ValueError(f"--extend must be >= 1 and --extend-context in 1..{num_latent - 1} (latent frames of a "
                         f"shot: {num_latent}), got {extend} and {extend_context}")
    given = None if init is None else given_bits(tokenizer, quantizer, init, init_frames, stage, cond.shape[0])
    gen = torch.Generator().manual_seed(seed)
    pieces, forwards, cache_bytes = [], 0, 0
    overlap = 1 + tokenizer.cfg.temporal_compression * (extend_context - 1)  # video frames re-encoded per shot
    for shot in range(extend):
        res = sample(model, quantizer, cond, num_latent, sampling, given, gen, window=stage.window)
        video = tokenizer.decode_latent(res.latent.transpose(1, 2))
        pieces.append(video if shot == 0 else video[:, :, overlap:])  # the context frames are already there
        given = encode_bits(tokenizer, quantizer, video[:, :, -overlap:])  # exactly extend_context latent frames
        forwards, cache_bytes = forwards + res.forwards, max(cache_bytes, res.cache_bytes)
    return torch.cat(pieces, dim=2), forwards, cache_bytes


def write_samples(frames: np.ndarray, out_dir: str | Path, fps: float, labels: list[str]) -> tuple[list[Path], Path]:
    """uint8 videos (B, T, H, W, 3) as sample-XX.mp4 plus a contact sheet: one row per sample, its caption (or
    class) in the label column."""
    out_dir = Path(out_dir)
    paths = []
    for i, clip in enumerate(frames):
        paths.append(out_dir / f"sample-{i:02d}.mp4")
        write_video(paths[-1], clip, fps=fps)
    sheet = out_dir / "samples.png"
    write_contact_sheet(sheet, list(frames), labels=labels, label_chars=30, min_cell=96)
    return paths, sheet


def sample_model_to_files(model: VideoAR, cfg: Config, step: int, tokenizer: VideoTokenizer, out_dir: str | Path,
                          prompts: list[str] = (), class_ids: list[int] = (), sampling: dict | None = None,
                          stage: StageConfig | None = None, init: str | Path | None = None, init_frames: int = 1,
                          seed: int = 0, frames: int | None = None, extend: int = 1, extend_context: int = 1
                          ) -> Samples:
    """Sample a model in memory (trained `step` steps with `cfg`) into .mp4 files, each with a JSON sidecar
    (prompt or class, seed, sampling, checkpoint step, stage, init, caption scores), and a contact sheet."""
    device = next(model.parameters()).device
    stage = stage or cfg.curriculum[-1]
    cond = condition(model, list(prompts), list(class_ids)).to(device)
    sampling_cfg = replace(cfg.sample, **(sampling or {}))  # the run's defaults, overridden per call
    video, forwards, cache_bytes = generate(model, cfg, tokenizer, cond, sampling_cfg, stage, init, init_frames,
                                            seed, frames, extend, extend_context)
    labels = list(prompts) if prompts else [f"class {i}" for i in class_ids]
    frames_u8 = to_uint8_frames(video)
    paths, sheet = write_samples(frames_u8, out_dir, cfg.data.fps, labels)
    scores = [caption_scores(f, p) for f, p in zip(frames_u8, prompts)] if prompts else [None] * len(paths)
    for i, path in enumerate(paths):  # what made each video, and how it scores against its caption
        meta = {"prompt": prompts[i]} if prompts else {"class": class_ids[i]}
        meta.update(seed=seed, sampling=asdict(sampling_cfg), checkpoint_step=step, stage=stage.name,
                    frames=int(frames_u8.shape[1]), window=stage.window, extend=extend,
                    extend_context=extend_context if extend > 1 else 0, init=str(init) if init else None,
                    init_frames=init_frames if init else 0, metrics=scores[i])
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    log.info("step %d: %d samples, %d forwards", step, len(paths), forwards)
    return Samples(paths, sheet, frames_u8, forwards, scores, cache_bytes)


def sample_to_files(ckpt: str | Path, out_dir: str | Path, prompts: list[str] = (), class_ids: list[int] = (),
                    sampling: dict | None = None, stage_name: str | None = None,
                    init: str | Path | None = None, init_frames: int = 1, seed: int = 0,
                    tokenizer_ckpt: str | Path | None = None, device: str = "cpu", frames: int | None = None,
                    extend: int = 1, extend_context: int = 1) -> Samples:
    """`sample_model_to_files` of a checkpoint (newest committed step of a root, a step directory or a
    consolidated file) with the tokenizer it was trained with."""
    device = rank_device(device)
    model, cfg, step = load_videoar(ckpt, str(device))
    tokenizer, _, _ = load_tokenizer(tokenizer_ckpt or cfg.videoar_train.tokenizer_ckpt, str(device))
    return sample_model_to_files(model, cfg, step, tokenizer, out_dir, prompts, class_ids, sampling,
                                 pick_stage(cfg, stage_name), init, init_frames, seed, frames, extend, extend_context)


def peak_memory_mib(device: str) -> float:
    """Peak device memory on CUDA; on the CPU the process's peak resident set (ru_maxrss is in KiB on Linux)."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--cfg-scale/--cfg-schedule/--temperature/--top-p: per-call overrides of the run's `sample` settings."""
    parser.add_argument("--cfg-scale", type=float, help="guidance for the constant schedule (default: run config)")
    parser.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help="guidance schedule over (frame, scale)")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-p", type=float, help="per-bit nucleus threshold")


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The `sample` fields given by `add_sampling_args`' options (absent ones keep the run's)."""
    return {k: v for k in ("cfg_scale", "cfg_schedule", "temperature", "top_p") if (v := getattr(args, k)) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoints root (newest committed step), a step directory or "
                                                      "a consolidated .safetensors (python -m parallel.consolidate)")
    parser.add_argument("--prompt", action="append", default=[], help="caption (repeat for a batch)")
    parser.add_argument("--class-id", action="append", type=int, default=[], help="class id (class-conditioned model)")
    parser.add_argument("--init", help="image or video whose first frames are given (image-to-video, continuation)")
    parser.add_argument("--init-frames", type=int, default=1, help="video frames of --init to keep: 1 + k * tau")
    add_sampling_args(parser)
    parser.add_argument("--stage", help="curriculum stage whose resolution/length/scales to use (default: last)")
    parser.add_argument("--tokenizer", help="tokenizer checkpoint (default: the one the run was trained with)")
    parser.add_argument("--frames", type=int, help="video frames to generate, 1 + k * tau (default: the stage's "
                                                   "length; longer = continuation beyond the trained length)")
    parser.add_argument("--extend", type=int, default=1, help="shots of the trained length, each continued from the "
                                                              "previous one's last frames re-encoded (N x the length)")
    parser.add_argument("--extend-context", type=int, default=1, help="latent frames of the previous shot that start "
                                                                      "the next one (1 = its last video frame)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to sample (cuda: cuda:0)")
    parser.add_argument("--out", default=None, help="output directory (default: <run.dir>/samples when --ckpt is "
                                                    "<run.dir>/videoar/checkpoints)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        overrides = sampling_overrides(args)
        out_dir = args.out or Path(args.ckpt).resolve().parent.parent / "samples"
        out = sample_to_files(args.ckpt, out_dir, args.prompt, args.class_id, overrides, args.stage, args.init,
                              args.init_frames, args.seed, args.tokenizer, args.device, args.frames, args.extend,
                              args.extend_context)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"{len(out.videos)} samples of {out.frames.shape[1]} frames ({out.forwards} transformer forwards, KV cache "
          f"{out.cache_bytes / 2**20:.1f} MiB, peak memory {peak_memory_mib(args.device):.0f} MiB): "
          f"{', '.join(str(p) for p in out.videos)}\ncontact sheet: {out.contact_sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
