"""The weight-free quality metrics on known inputs and on real clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline import synth
from trainer.evaluate_videos import main as evaluate_main, score_folder
from trainer.video_metrics import (caption_scores, drift_curve, frechet_distance, parse_caption, psnr_per_frame,
                                   ssim, ssim_per_frame)


def test_frechet_distance_matches_the_closed_form():
    """Gaussians with diagonal covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2."""
    rng = np.random.default_rng(0)
    n, mu_a, mu_b = 200_000, np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a, b = mu_a + sd_a * rng.standard_normal((n, 3)), mu_b + sd_b * rng.standard_normal((n, 3))
    expected = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()  # 5 + 2 = 7
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a, b[:, :2])


def test_ssim_and_psnr_on_known_inputs():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert (ssim(x, 1 - x) < 0).all()  # anti-correlated structure
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert 0.3 < ssim(x, noisy).mean() < 0.99
    v = torch.zeros(1, 3, 4, 8, 8)
    w = v.clone()
    w[:, :, 2] += 0.2  # frame 2 off by 0.1 in [0, 1] units: PSNR 20 dB there, identical elsewhere
    p = psnr_per_frame(v, w)
    assert p[2].item() == pytest.approx(20.0, abs=1e-4) and (p[[0, 1, 3]] > 100).all()
    s = ssim_per_frame(v, w)
    assert s[0].item() == pytest.approx(1.0) and s[2].item() < 1.0
    assert drift_curve(v, w) == pytest.approx([0.0, 0.0, 0.1, 0.0])


def test_captions_parse_and_real_clips_score_perfectly(tmp_path):
    assert parse_caption("a red circle moving up-left and an orange ring slowly moving down over a plain gray "
                         "background") == [{"color": "red", "shape": "circle", "direction": "up-left"},
                                           {"color": "orange", "shape": "ring", "direction": "down"}]
    assert parse_caption("a cat on a mat") == []
    synth.generate_clips(tmp_path, 20, frames=9, size=32, seed=2, progress=False, world="easy")
    mean, rows = score_folder(tmp_path, progress=False)
    assert len(rows) == 20 and mean["videos"] == 20
    for k in ("color", "shape", "direction", "present", "present_90"):
        assert mean[k] >= 0.95, (k, mean)
    # a video scored against another clip's caption (different colour): the detectors see that
    meta = json.loads((tmp_path / "clip-00000.json").read_text())
    frames = synth.render_clip(meta, 9, 32, 32)
    other = next(c for c in synth.WORLDS["easy"].colors if c != meta["objects"][0]["color"])
    wrong = caption_scores(frames, meta["caption"].replace(meta["objects"][0]["color"], other, 1))
    assert wrong["color"] == 0.0 and wrong["present"] == 0.0
    assert evaluate_main(["--samples", str(tmp_path), "--json", str(tmp_path / "scores.json")]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["mean"]["videos"] == 20
