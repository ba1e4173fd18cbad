"""Shared fixtures: a tiny config and real H.264 clips generated once per session (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.synth import generate_clips
from trainer.config import Config, load_config

TINY = [
    "data.resolution=[32,32]", "data.frames=5", "data.synth_frames=13", "data.heldout_clips=2",
    "tokenizer.latent_dim=8", "tokenizer.spatial_compression=8", "tokenizer.temporal_compression=4",
    "tokenizer.base_channels=8", "tokenizer.channel_mult=[1,2,2]", "quantizer.scales=[1,2,4]",
]


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    generate_clips(out, 8, frames=13, size=32, fps=8, seed=0, progress=False)
    return out


@pytest.fixture
def tiny_cfg(clips_dir, tmp_path) -> Config:
    return load_config(None, TINY + [f"data.clips_dir={clips_dir}", f"run.dir={tmp_path / 'run'}"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
