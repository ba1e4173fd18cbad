"""Shared fixtures: tiny configs, real H.264 clips and a tiny tokenizer made once per session (nothing is
downloaded)."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.synth import generate_clips
from models.tokenizer import VideoTokenizer
from trainer.config import Config, load_config
from trainer.tokenizer_ckpt import save_tokenizer

TINY = [
    "data.resolution=[32,32]", "data.frames=5", "data.synth_frames=13", "data.heldout_clips=2",
    "tokenizer.latent_dim=8", "tokenizer.spatial_compression=8", "tokenizer.temporal_compression=4",
    "tokenizer.base_channels=8", "tokenizer.channel_mult=[1,2,2]", "quantizer.scales=[1,2,4]",
]
VIDEOAR = [
    "videoar.preset=custom", "videoar.depth=2", "videoar.width=32", "videoar.heads=2", "videoar.cond=class",
    "videoar.num_classes=8", "videoar_train.log_every=1", "videoar_train.warmup_steps=2",
]


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    generate_clips(out, 8, frames=13, size=32, fps=8, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tokenizer_ckpt(clips_dir, tmp_path_factory):
    """A randomly initialised tiny tokenizer: a fixed, deterministic encoder is all these tests need."""
    cfg = load_config(None, TINY + [f"data.clips_dir={clips_dir}"])
    torch.manual_seed(0)
    return save_tokenizer(VideoTokenizer(cfg.tokenizer, cfg.quantizer), cfg, tmp_path_factory.mktemp("tok"), 0)


def make_cfg(clips_dir, tokenizer_ckpt, run_dir, *extra) -> Config:
    """TINY + a tiny class-conditioned VideoAR trained on the session clips with the session tokenizer."""
    return load_config(None, TINY + VIDEOAR + [f"data.clips_dir={clips_dir}", f"run.dir={run_dir}",
                                               f"videoar_train.tokenizer_ckpt={tokenizer_ckpt}", *extra])


@pytest.fixture
def tiny_cfg(clips_dir, tmp_path) -> Config:
    return load_config(None, TINY + [f"data.clips_dir={clips_dir}", f"run.dir={tmp_path / 'run'}"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
