"""Cross-Frame Error Correction (DESIGN §3.6) checked against its definition."""

from __future__ import annotations

import pytest
import torch

from common.train_config import StageConfig
from models.layout import SequenceLayout
from models.objective import prepare_batch, sample_generator
from models.quantizer import MultiScaleBitwiseQuantizer, QuantizerConfig

D, T = 16, 4


@pytest.fixture(scope="module")
def quantizer():
    return MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 4, 8]))


def clips(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 1, D, 8, 8, generator=g)  # frames of one clip are correlated, like video
    return 0.3 * (base + 0.3 * torch.randn(batch, T, D, 8, 8, generator=g))


def test_zero_flip_ratio_is_exactly_plain_teacher_forcing(quantizer):
    f = clips(3)
    ec = quantizer.encode_with_error_correction(f, p_max=0.0, p_min=0.0, delta=0.0)
    assert not ec.ratios.any()
    for t in range(T):
        plain = quantizer.encode(f[:, t])
        for k in range(quantizer.num_scales):
            assert torch.equal(ec.labels[k][:, t], plain[k]) and torch.equal(ec.inputs[k][:, t], plain[k])
        assert torch.equal(ec.recon[:, t], quantizer.decode(plain))


def test_empirical_flip_rate_matches_the_drawn_ratio(quantizer):
    f = clips(400, seed=1)
    ec = quantizer.encode_with_error_correction(f, p_max=0.25, generator=torch.Generator().manual_seed(2))
    for k in range(quantizer.num_scales):
        flipped = (ec.labels[k] ^ ec.inputs[k]).double().mean(dim=(2, 3, 4))  # (B, T) per-sample rate
        # pooled over samples: expected flips = sum of drawn ratios (binomial std < 0.004 here)
        pooled_err = (flipped.mean(0) - ec.ratios[:, :, k].mean(0)).abs().max().item()
        assert pooled_err < 0.02, f"scale {k}: pooled flip rate off by {pooled_err:.4f}"
    finest = (ec.labels[-1] ^ ec.inputs[-1]).double().mean(dim=(2, 3, 4))
    per_sample = (finest - ec.ratios[:, :, -1]).abs().max().item()  # 1024 bits per sample: 6 sigma < 0.09
    assert per_sample < 0.09, per_sample
    corr = torch.corrcoef(torch.stack([finest.flatten(), ec.ratios[:, :, -1].flatten()]))[0, 1].item()
    assert corr > 0.95, corr


def test_ratios_respect_time_bounds_and_inheritance(quantizer):
    p_min, p_max, delta = 0.02, 0.25, 0.01
    ec = quantizer.encode_with_error_correction(clips(300, seed=3), p_max=p_max, p_min=p_min, delta=delta,
                                                generator=torch.Generator().manual_seed(4))
    r = ec.ratios
    for t in range(T):
        lo, hi = p_min + delta * t, p_max + delta * t
        assert (r[:, t] >= lo - 1e-12).all() and (r[:, t] <= hi + 1e-12).all()
        if t:
            assert (r[:, t, 0] >= r[:, t - 1, -1] - 1e-12).all(), "first scale must inherit the previous final ratio"
    # the range is used: draws spread over [lo, hi] rather than collapsing
    assert r[:, 0, 1].min() < p_min + 0.03 and r[:, 0, 1].max() > p_max - 0.03
    with pytest.raises(ValueError, match="p_min <= p_max"):
        quantizer.encode_with_error_correction(clips(1), p_max=0.1, p_min=0.2)


def test_labels_correct_toward_the_clean_latent(quantizer):
    """At every scale, adding the label's code to the corrupted reconstruction lands closer to the clean latent
    than adding the flipped bits the model saw would."""
    f = clips(64, seed=5)
    ec = quantizer.encode_with_error_correction(f, p_max=0.25, generator=torch.Generator().manual_seed(6))
    for t in range(T):
        acc = torch.zeros_like(f[:, t])
        for k in range(quantizer.num_scales):
            with_label = quantizer.add_scale(acc, ec.labels[k][:, t], k)
            with_noisy = quantizer.add_scale(acc, ec.inputs[k][:, t], k)
            err_label = (with_label - f[:, t]).pow(2).mean().item()
            err_noisy = (with_noisy - f[:, t]).pow(2).mean().item()
            assert err_label < err_noisy, (t, k, err_label, err_noisy)
            acc = with_noisy
        torch.testing.assert_close(acc, ec.recon[:, t])


def test_without_inheritance_the_first_scale_is_drawn_from_the_time_bounds(quantizer):
    """`inherit=False` (videoar_train.flip_inherit): p = U(lo, hi) at every scale. The draws are the same in number
    and order, so with one seed every ratio but the first scale of frames t > 0 is the same as with inheritance,
    and those are the same uniform u mapped onto [lo, hi] instead of [max(lo, p_prev), hi]."""
    p_min, p_max, delta = 0.0, 0.25, 0.01
    f = clips(200, seed=7)
    on = quantizer.encode_with_error_correction(f, p_max, p_min, delta, torch.Generator().manual_seed(8))
    default = quantizer.encode_with_error_correction(f, p_max, p_min, delta, torch.Generator().manual_seed(8),
                                                     inherit=True)
    off = quantizer.encode_with_error_correction(f, p_max, p_min, delta, torch.Generator().manual_seed(8),
                                                 inherit=False)
    assert torch.equal(on.ratios, default.ratios) and torch.equal(on.recon, default.recon)
    r_on, r_off = on.ratios, off.ratios
    assert torch.equal(r_on[:, 0], r_off[:, 0]) and torch.equal(r_on[:, :, 1:], r_off[:, :, 1:])
    for t in range(1, T):
        lo, hi = p_min + delta * t, p_max + delta * t
        prev = r_on[:, t - 1, -1]
        assert (r_off[:, t] >= lo - 1e-12).all() and (r_off[:, t] <= hi + 1e-12).all()
        below = (r_off[:, t, 0] < prev).double().mean().item()
        assert 0.3 < below < 0.7, (t, below)  # inheritance would forbid every one of these
        assert (r_on[:, t, 0] >= prev - 1e-12).all()
        u = (r_off[:, t, 0] - lo) / (hi - lo)
        floor = prev.clamp(min=lo)
        torch.testing.assert_close(r_on[:, t, 0], floor + (hi - floor) * u, rtol=0, atol=1e-12)
    # one sample by value: seeded, frame 1's first ratio drops below frame 0's final one only without inheritance
    i = int(torch.nonzero(r_off[:, 1, 0] < r_on[:, 0, -1])[0])
    assert [r_off[i, 1, 0].item(), r_on[i, 0, -1].item(), r_on[i, 1, 0].item()] == \
        pytest.approx([0.174647, 0.200567, 0.239709], abs=1e-6)


def test_prepare_batch_passes_inheritance_through(quantizer):
    """The trainer's path (models/objective.py prepare_batch): the mean drawn ratio with inheritance is never lower
    (same uniforms, a higher floor), and p_max = 0 is plain teacher forcing either way."""
    lat, cond, stage = clips(6, seed=9), torch.zeros(6, dtype=torch.long), StageConfig()
    layout = SequenceLayout(1, T, tuple(quantizer.sizes))

    def run(p_max, inherit):
        gens = [sample_generator(0, 1, j) for j in range(6)]
        return prepare_batch(quantizer, layout, lat, cond, stage, 0.1, p_max, 0.0, 0.01, gens, inherit=inherit)
    on, off = run(0.25, True), run(0.25, False)
    assert (on.flip_ratio >= off.flip_ratio).all() and (on.flip_ratio > off.flip_ratio).any()
    assert not torch.equal(on.features, off.features)
    plain_on, plain_off = run(0.0, True), run(0.0, False)
    assert torch.equal(plain_on.features, plain_off.features) and torch.equal(plain_on.targets, plain_off.targets)
