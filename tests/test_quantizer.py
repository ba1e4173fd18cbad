"""Multi-scale residual bitwise quantizer on latents of real encoded clips (DESIGN §3.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.clips import to_model_input
from data_pipeline.video_io import read_video
from models.quantizer import MultiScaleBitwiseQuantizer, QuantizerConfig
from models.sequence_inputs import split_frames_scales, teacher_forcing_features
from models.tokenizer import TokenizerConfig, VideoTokenizer


@pytest.fixture(scope="module")
def latents(clips_dir):
    """Per-frame latents (N, 8, 8, 8) of 4 real H.264 clips through a (seeded) causal encoder at 64x64."""
    torch.manual_seed(0)
    tok = VideoTokenizer(TokenizerConfig(latent_dim=8, base_channels=8, channel_mult=[1, 2, 2]),
                         QuantizerConfig(scales=[1, 2, 4, 8])).eval()
    clips = np.stack([read_video(clips_dir / f"clip-{i:05d}.mp4", num_frames=9, size=64) for i in range(4)])
    with torch.no_grad():
        f = tok.frames_to_batch(tok.encode_latent(to_model_input(clips)))
    return tok.quantizer, f


def test_error_strictly_decreases_as_scales_are_added(latents):
    q, f = latents
    bits = q.encode(f)
    per_frame = torch.stack([(q.decode(bits, n) - f).pow(2).mean(dim=(1, 2, 3)) for n in range(1, q.num_scales + 1)])
    diffs = per_frame[1:] - per_frame[:-1]
    assert (diffs < 0).all(), f"per-frame MSE by number of scales:\n{per_frame.T}"
    total = per_frame.mean(1)
    assert total[-1] < 0.5 * total[0], f"MSE with all scales {total[-1]:.4f} vs first scale {total[0]:.4f}"


def test_bits_codes_and_indices_round_trip_exactly(latents):
    q, f = latents
    for k, bits in enumerate(q.encode(f)):
        code = q.code(bits, k)
        assert torch.equal(q.code_to_bits(code), bits)
        # quantizer.gain=fixed (the default): the paper's codes +-1/sqrt(d) at every scale
        assert q.log_gain is None and q.gain(k) == 1.0
        assert torch.allclose(code.abs(), torch.full_like(code, 1 / math.sqrt(q.dim)))
        idx = q.bits_to_index(bits)
        assert idx.shape == (bits.shape[0], *bits.shape[2:]) and idx.min() >= 0 and idx.max() < 2 ** q.dim
        assert torch.equal(q.index_to_bits(idx, q.dim), bits)
    assert torch.equal(q.bits_to_index(torch.tensor([[True, False, True]]).view(1, 3, 1, 1)), torch.tensor([[[5]]]))


def test_encode_forward_decode_and_teacher_forcing_features_mirror_each_other(latents):
    q, f = latents
    out = q(f.clone().requires_grad_())
    bits = q.encode(f)
    assert all(torch.equal(a, b) for a, b in zip(out.bits, bits))
    torch.testing.assert_close(out.quantized, q.decode(bits))
    # one-frame clips: the training path's per-scale inputs, split back into grids (scale 0 is the SOS slot)
    features = teacher_forcing_features(q, [b.unsqueeze(1) for b in bits])
    inputs = [x[:, 0] for x in split_frames_scales(features, 1, q.sizes)[1:]]
    assert [tuple(x.shape[-2:]) for x in inputs] == q.sizes[1:]
    for k, x in enumerate(inputs, start=1):
        torch.testing.assert_close(x, q.next_input(q.decode(bits, k), k))  # what sampling computes step by step
    # each scale's bits are the sign of the down-sampled residual left by the previous scales
    for k in range(q.num_scales):
        residual = f - (q.decode(bits, k) if k else torch.zeros_like(f))
        expected, _ = q.quantize_scale(residual, k)
        assert torch.equal(bits[k], expected)


def test_losses_are_finite_and_entropy_rewards_balanced_bits(latents):
    q, f = latents
    out = q(f)
    assert torch.isfinite(out.commit_loss) and out.commit_loss > 0
    # entropy penalty: per-token entropy - batch entropy, so each term is within [0, ln 2]
    assert -math.log(2) - 1e-6 <= out.entropy_loss.item() <= math.log(2) + 1e-6


def test_non_square_scales_and_grid_errors():
    q = MultiScaleBitwiseQuantizer(4, QuantizerConfig(scales=[1, 2, 4], scales_w=[2, 3, 6]))
    f = torch.randn(3, 4, 4, 6)
    bits = q.encode(f)
    assert [tuple(b.shape[-2:]) for b in bits] == [(1, 2), (2, 3), (4, 6)]
    assert q.decode(bits).shape == f.shape
    with pytest.raises(ValueError, match=r"expects \(N, 4, 4, 6\)"):
        q.encode(torch.randn(3, 4, 4, 4))
    with pytest.raises(ValueError, match="num_scales"):
        q.decode(bits, 0)


def test_learned_gains_are_keyed_by_side_and_every_stage_schedule_reconstructs(latents):
    """quantizer.gain=learned: one gain per side length of the tokenizer's schedule. A curriculum stage's view
    (another schedule) uses the gain of each side it shares, whatever that side's position, reconstructs its own
    grid better with every scale it adds, and a side the tokenizer never had is refused."""
    fixed, f = latents
    q = MultiScaleBitwiseQuantizer(fixed.dim, QuantizerConfig(scales=[1, 2, 4, 8], gain="learned"))
    with torch.no_grad():
        q.log_gain.copy_(torch.tensor([0.5, 0.2, -0.3, -0.9]))
    assert q.gain_slot == {(1, 1): 0, (2, 2): 1, (4, 4): 2, (8, 8): 3}
    for sizes in ([(1, 1), (2, 2), (4, 4)], [(2, 2), (4, 4)], [(1, 1), (4, 4), (8, 8)]):
        view = q.for_sizes(sizes)
        for k, s in enumerate(sizes):
            assert float(view.gain(k)) == pytest.approx(float(q.log_gain[q.gain_slot[s]].exp()))
        grid = torch.nn.functional.interpolate(f, size=sizes[-1], mode="area")
        bits = view.encode(grid)
        errors = [(view.decode(bits, n) - grid).pow(2).mean().item() for n in range(1, len(sizes) + 1)]
        assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0], (sizes, errors)
    with pytest.raises(ValueError, match=r"scale sides \[\(3, 3\)\] have no learned gain"):
        q.for_sizes([(1, 1), (3, 3)])
    assert fixed.for_sizes([(1, 1), (3, 3)]).gain(1) == 1.0  # fixed codes work on any schedule


@pytest.mark.parametrize("gain", ["fixed", "learned"])
def test_scale_dropout_decodes_each_item_from_its_own_prefix(latents, gain):
    """`keep` changes only what `quantized` holds: item i is its reconstruction from its first keep[i] scales
    (what `decode` gives for those bits); bits and aux losses are those of all scales."""
    f = latents[1][:3]
    q = MultiScaleBitwiseQuantizer(f.shape[1], QuantizerConfig(scales=[1, 2, 4, 8], gain=gain))
    keep = torch.tensor([1, 4, 2])
    full, dropped = q(f), q(f, keep)
    assert all(torch.equal(a, b) for a, b in zip(full.bits, dropped.bits))
    assert torch.equal(full.commit_loss, dropped.commit_loss) and torch.equal(full.entropy_loss, dropped.entropy_loss)
    for i, k in enumerate(keep.tolist()):
        torch.testing.assert_close(dropped.quantized[i], q.decode([b[i:i + 1] for b in full.bits], k)[0])
    torch.testing.assert_close(dropped.quantized[1], full.quantized[1])
    assert not torch.allclose(dropped.quantized[0], full.quantized[0])


def test_tokenizer_scale_dropout_is_off_by_default_and_draws_per_clip():
    """scale_dropout=0 draws no random numbers (runs without it are unchanged); near 1 every clip is decoded from
    a proper prefix, the same k for all its latent frames."""
    torch.manual_seed(0)
    model = VideoTokenizer(TokenizerConfig(latent_dim=8, base_channels=8, channel_mult=[1, 2], spatial_compression=4,
                                           num_res_blocks=1),
                           QuantizerConfig(scales=[1, 2, 4, 8]))
    x = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    torch.manual_seed(1)
    plain = model(x)
    after_plain = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(model(x, 0.0).recon, plain.recon) and torch.equal(torch.rand(1), after_plain)
    dropped = model(x, 0.999)
    bits = plain.quant.bits
    for b in range(2):
        frames = slice(b * 2, b * 2 + 2)  # 5 frames -> 2 latent frames per clip
        ks = [k for k in range(1, 4) if torch.allclose(
            dropped.recon[b], model.decode_bits([s[frames] for s in bits], 1, k)[0], atol=1e-5)]
        assert len(ks) == 1, ks


def test_scale_dropout_config_is_checked():
    from common.config import load_config
    from common.validation import ConfigError

    assert load_config(None, ["tokenizer_train.scale_dropout=0.25"]).tokenizer_train.scale_dropout == 0.25
    with pytest.raises(ConfigError, match="tokenizer_train.scale_dropout"):
        load_config(None, ["tokenizer_train.scale_dropout=1.0"])
