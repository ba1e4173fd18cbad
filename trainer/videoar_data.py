"""Where the VideoAR trainer's samples come from, per curriculum stage: preprocessed shards (`data.shards`, local
or S3) read through the streaming loader, or else the windows of `data.clips_dir` encoded once with the frozen
tokenizer and cached in `<run.dir>/videoar/latents/`. The held-out split is `data_pipeline.clips.split_heldout`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from common.config import Config
from common.train_config import StageConfig
from data_pipeline.clips import IMAGE_EXTS, caption_vocabulary, list_clip_files, load_clip_folder, split_heldout
from data_pipeline.latent_set import cache_key, encode_latent_set, load_latent_set, save_latent_set
from data_pipeline.loader import ShardSet
from data_pipeline.tokenizer_ckpt import WEIGHTS, load_tokenizer
from models.text_encoder import TextEncoder


def out_dir(cfg: Config) -> Path:
    return cfg.run_dir / "videoar"


def load_frozen_tokenizer(cfg: Config, device: torch.device):
    """The frozen tokenizer on this rank's device (`cuda:<local rank>`, never every rank on cuda:0)."""
    tok, tok_cfg, _ = load_tokenizer(cfg.videoar_train.tokenizer_ckpt, str(device))
    for section in ("tokenizer", "quantizer"):
        if getattr(tok_cfg, section) != getattr(cfg, section):
            raise ValueError(f"{cfg.videoar_train.tokenizer_ckpt}: its {section} config differs from this run's "
                             f"{section} section; train VideoAR with the config the tokenizer was trained with")
    return tok.requires_grad_(False)


def stage_data(cfg: Config, tokenizer, stage: StageConfig, progress: bool, heldout: bool = False):
    """The training samples of a stage part (`StageConfig.parts`: a `ShardSet` or a `LatentSet`); with `heldout`,
    the evaluation samples: data.eval_shards, or the windows of the last data.heldout_clips clips. A part of
    frames = 1 (a joint stage's images) reads the `<H>x<W>x1` shard bucket, or every frame of the clips and every
    image file of data.clips_dir."""
    v, d = cfg.videoar, cfg.data
    if d.shards:
        bucket = f"{stage.resolution[0]}x{stage.resolution[1]}x{stage.frames}"
        return ShardSet(d.eval_shards if heldout else d.shards, bucket, d.endpoint_url or None, d.loader_workers)
    path, key = latent_cache(cfg, stage, heldout)
    cached = load_latent_set(path, key)
    if cached is not None:
        return cached
    clips_dir = Path(d.clips_dir)
    clips = load_clip_folder(clips_dir, tuple(stage.resolution), stage.frames, progress, d.class_folders)
    train, held = split_media(clips, d.heldout_clips, clips_dir)
    encoder = None
    if v.cond == "text":
        encoder = TextEncoder(v.text_encoder, v.text_len, str(next(tokenizer.parameters()).device))
        if encoder.dim != v.text_dim:
            raise ValueError(f"videoar.text_dim={v.text_dim} but {v.text_encoder} has width {encoder.dim}")
    ds = encode_latent_set(tokenizer, held if heldout else train, stage.frames, v.cond, encoder, v.num_classes,
                           progress=progress, vocabulary=caption_vocabulary(clips_dir, d.class_folders))
    save_latent_set(ds, path, key)
    return ds


def split_media(clips: list, heldout: int, source: Path) -> tuple[list, list]:
    """(training, held-out) clips: the held-out tail of the videos (the same for every stage part); image files
    (in a frames = 1 part) all train, unless the folder holds images only."""
    videos = [c for c in clips if c.path.suffix.lower() not in IMAGE_EXTS]
    images = [c for c in clips if c.path.suffix.lower() in IMAGE_EXTS]
    if not videos:
        return split_heldout(images, heldout, source)
    train, held = split_heldout(videos, heldout, source)
    return train + images, held


def latent_cache(cfg: Config, stage: StageConfig, heldout: bool = False) -> tuple[Path, str]:
    """(path, key) of a stage's encoded-latent cache; the key covers the tokenizer, the clips and the settings."""
    v, d = cfg.videoar, cfg.data
    clips_dir = Path(d.clips_dir)
    files = list_clip_files(clips_dir, d.class_folders, images=stage.frames == 1)
    listing = [(str(p.relative_to(clips_dir)), p.stat().st_size, c) for p, c, _ in files]
    weights = Path(cfg.videoar_train.tokenizer_ckpt) / WEIGHTS
    key = cache_key(weights.stat().st_mtime_ns, weights.stat().st_size, listing, d.heldout_clips, stage.resolution,
                    stage.frames, v.cond, v.text_encoder, v.text_len, v.num_classes, "classes-of-the-folder")
    name = f"{'heldout-' if heldout else ''}{stage.name}-{stage.resolution[0]}x{stage.resolution[1]}-f{stage.frames}"
    return out_dir(cfg) / "latents" / f"{name}.safetensors", key


def wait_for_stage_data(cfg: Config, stage: StageConfig, heldout: bool, timeout_s: float, poll_s: float = 2.0):
    """What `stage_data` returns, once another rank (rank 0) has encoded and cached it: the waiting is on the
    shared filesystem, not in a collective, so a long encode cannot trip the collective timeout."""
    if cfg.data.shards:
        return stage_data(cfg, None, stage, False, heldout)
    path, key = latent_cache(cfg, stage, heldout)
    deadline, seen = time.monotonic() + timeout_s, None
    while True:
        stamp = path.stat().st_mtime_ns if path.is_file() else None
        if stamp is not None and stamp != seen:  # read only a file rank 0 has (re)written since the last look
            seen = stamp
            if (cached := load_latent_set(path, key)) is not None:
                return cached
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: rank 0 has not written the encoded latents of stage {stage.name} within "
                               f"parallel.data_wait_s={timeout_s:g} s (see rank 0's log; run.dir must be on a "
                               "filesystem every rank shares)")
        time.sleep(poll_s)
