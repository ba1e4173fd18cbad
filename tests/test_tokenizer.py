"""Causal 3D tokenizer: shapes, causality, chunked == whole encoding, 2D->3D inflation, straight-through grads."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.clips import to_model_input
from data_pipeline.video_io import read_video
from models.quantizer import QuantizerConfig
from models.tokenizer import TokenizerConfig, VideoTokenizer, inflate_from_2d


def make(tau=4, time_kernel=3, scales=(1, 2, 4), gain="fixed") -> VideoTokenizer:
    cfg = TokenizerConfig(latent_dim=8, spatial_compression=8, temporal_compression=tau, base_channels=8,
                          channel_mult=[1, 2, 2], time_kernel=time_kernel)
    return VideoTokenizer(cfg, QuantizerConfig(scales=list(scales), gain=gain)).eval()


def real_clip(clips_dir, frames=13) -> torch.Tensor:
    return to_model_input(read_video(clips_dir / "clip-00000.mp4", num_frames=frames, size=32))


def test_frame_counts_and_shape_errors():
    tok = make()
    assert tok.encode_latent(torch.zeros(2, 3, 9, 32, 32)).shape == (2, 8, 3, 4, 4)
    assert tok.encode_latent(torch.zeros(1, 3, 1, 32, 32)).shape == (1, 8, 1, 4, 4)
    assert tok.decode_latent(torch.zeros(1, 8, 3, 4, 4)).shape == (1, 3, 9, 32, 32)
    with pytest.raises(ValueError, match="1 \\+ k\\*4 frames"):
        tok.encode_latent(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="divisible by spatial_compression"):
        tok.encode_latent(torch.zeros(1, 3, 5, 36, 32))


def test_causality_future_frames_do_not_change_past_latents(clips_dir):
    """Latent frame j summarises input frames <= tau*j; changing frames after t must leave those bit-identical."""
    tok, x = make(), real_clip(clips_dir)
    with torch.no_grad():
        base = tok.encode_latent(x)
        base_bits = tok.encode_bits(x)
        for t in (0, 4, 8):
            y = x.clone()
            y[:, :, t + 1:] = torch.rand_like(y[:, :, t + 1:]) * 2 - 1
            z = tok.encode_latent(y)
            keep = t // 4 + 1  # latent frames 0..t/4 read only frames <= t
            assert torch.equal(z[:, :, :keep], base[:, :, :keep]), f"future frames leaked into latents <= {t}"
            assert not torch.equal(z[:, :, keep:], base[:, :, keep:])
            bits = tok.encode_bits(y)  # frames are flattened frame-major: frame j is row j for batch 1
            assert all(torch.equal(b[:keep], bb[:keep]) for b, bb in zip(bits, base_bits))
        recon = tok.decode_latent(base)
        y = base.clone()
        y[:, :, 2:] += 1.0
        assert torch.equal(tok.decode_latent(y)[:, :, :5], recon[:, :, :5]), "decoder is not causal"


@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_encoding_equals_whole(clips_dir, chunk):
    tok, x = make(), real_clip(clips_dir)
    with torch.no_grad():
        whole, chunked = tok.encode_latent(x), tok.encode_latent(x, chunk_frames=chunk)
    assert whole.shape == chunked.shape == (1, 8, 4, 4, 4)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of tau"):
        tok.encode_latent(x, chunk_frames=6)


def test_inflated_3d_tokenizer_reproduces_2d_on_a_single_frame(clips_dir):
    """A 2D tokenizer (time kernel 1, no temporal down-sampling) inflated with zero temporal slices gives the
    2D result on one frame: latents, bits and reconstruction."""
    torch.manual_seed(1)
    tok2d = make(tau=1, time_kernel=1)
    for p in tok2d.parameters():  # non-trivial weights everywhere (norm affine params included)
        p.data.add_(torch.randn_like(p) * 0.05)
    tok3d = make(tau=4, time_kernel=3)
    inflate_from_2d(tok3d, tok2d.state_dict())
    frame = real_clip(clips_dir, frames=1)
    with torch.no_grad():
        z2, z3 = tok2d.encode_latent(frame), tok3d.encode_latent(frame)
        torch.testing.assert_close(z3, z2, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(tok3d.encode_bits(frame), tok2d.encode_bits(frame)))
        torch.testing.assert_close(tok3d(frame).recon, tok2d(frame).recon, rtol=1e-5, atol=1e-5)
    # the 3D kernels hold the 2D kernel in the last temporal slice and zeros elsewhere
    w3 = tok3d.encoder.conv_in.conv.weight
    assert torch.equal(w3[:, :, -1], tok2d.encoder.conv_in.conv.weight[:, :, 0]) and not w3[:, :, :-1].any()
    with pytest.raises(ValueError, match="mode"):
        inflate_from_2d(tok3d, tok2d.state_dict(), mode="mean")


@pytest.mark.parametrize("gain", ["fixed", "learned"])
def test_straight_through_gradients_reach_the_encoder(clips_dir, gain):
    tok, x = make(gain=gain), real_clip(clips_dir, frames=5)
    tok.train()
    out = tok(x)
    # the forward value is the quantized reconstruction, the gradient w.r.t. the latent is the identity
    f = tok.frames_to_batch(out.latent)
    torch.testing.assert_close(out.quant.quantized, tok.quantizer.decode(tok.quantizer.encode(f)))
    probe = torch.randn_like(out.quant.quantized)
    (g,) = torch.autograd.grad((out.quant.quantized * probe).sum(), out.latent, retain_graph=True)
    torch.testing.assert_close(g, tok.batch_to_frames(probe, x.shape[0]))
    (out.recon - x).abs().mean().backward()  # reconstruction loss only: no aux losses
    enc_grad = sum(p.grad.abs().sum().item() for p in tok.encoder.parameters() if p.grad is not None)
    assert enc_grad > 0, "no gradient reached the encoder through the quantizer"
    if gain == "learned":
        assert tok.quantizer.log_gain.grad is not None and tok.quantizer.log_gain.grad.abs().sum() > 0
    else:  # the paper's codes: nothing to learn in the quantizer
        assert tok.quantizer.log_gain is None and not list(tok.quantizer.parameters())


def test_a_checkpoint_from_before_quantizer_gain_loads_with_its_learned_gains(tmp_path):
    """Tokenizer checkpoints written before `quantizer.gain` existed have learned gains (`quantizer.log_gain`) and no
    `gain` key in their config: they load as `learned` with their gains, not refused as a mismatch."""
    import json

    from common.config import Config, DataConfig
    from data_pipeline.tokenizer_ckpt import CONFIG, load_tokenizer, save_tokenizer

    torch.manual_seed(0)
    tok = make(gain="learned")
    with torch.no_grad():
        tok.quantizer.log_gain.copy_(torch.tensor([0.3, -0.2, -0.5]))
    # the (1, 2, 4) schedule's 4x4 latent grid at f=8: 32x32 clips
    cfg = Config(data=DataConfig(resolution=[32, 32]), tokenizer=tok.cfg, quantizer=tok.qcfg)
    save_tokenizer(tok, cfg, tmp_path, step=7)
    raw = json.loads((tmp_path / CONFIG).read_text())
    del raw["quantizer"]["gain"]
    (tmp_path / CONFIG).write_text(json.dumps(raw))
    loaded, loaded_cfg, step = load_tokenizer(tmp_path)
    assert step == 7 and loaded_cfg.quantizer.gain == "learned"
    assert torch.equal(loaded.quantizer.log_gain, tok.quantizer.log_gain)
