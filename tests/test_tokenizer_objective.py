"""Tokenizer objective (paper Eq. 4): hinge GAN losses, LeCAM, the adaptive generator weight, the causal 3D
discriminator, the perceptual term with a scripted local network, the wiring into tokenizer training, and
initialisation from a 2D image tokenizer (`tokenizer_train.init_from`)."""

from __future__ import annotations

import json
from typing import List

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from common.config import load_config
from common.metrics import psnr
from common.validation import ConfigError
from data_pipeline.clips import load_clip_folder
from data_pipeline.tokenizer_ckpt import load_tokenizer
from models.discriminator import CausalDiscriminator3d
from models.tokenizer import VideoTokenizer
from models.tokenizer_losses import (LeCAM, PerceptualLoss, adaptive_generator_weight, hinge_d_loss, hinge_g_loss,
                                     load_perceptual_net)
from tests.conftest import TINY
from trainer.tokenizer_eval import tokenizer_quality
from trainer.tokenizer_gan import DISC_WEIGHTS, build_discriminator
from trainer.tokenizer_init import init_from_2d
from trainer.train_tokenizer import eval_batch, train_tokenizer

TWO_D = ["tokenizer.time_kernel=1", "tokenizer.temporal_compression=1", "data.frames=1"]


class TinyFeatures(nn.Module):
    """A stand-in perceptual network: two feature maps of frames (N, 3, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        a = torch.relu(self.conv1(x))
        return [a, self.conv2(a)]


@pytest.fixture
def perceptual_file(tmp_path):
    torch.manual_seed(3)
    net = TinyFeatures()
    path = tmp_path / "features.pt"
    torch.jit.script(net).save(str(path))
    return net, path


def test_hinge_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6), relu(1 + fake) = [0, 1, 2.5] (mean 7/6): 0.5 * (5/6 + 7/6) = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert hinge_g_loss(fake).item() == pytest.approx(0.5 / 3)  # -mean([-2, 0, 1.5])
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -4.0])).item() == 0.0  # margins met


def test_lecam_ema_update_and_regularizer_on_known_values():
    lecam = LeCAM(decay=0.9)
    lecam.update(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0]))  # the first update takes the means as they are
    assert (lecam.ema_real.item(), lecam.ema_fake.item()) == pytest.approx((2.0, -0.5))
    lecam.update(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert lecam.ema_real.item() == pytest.approx(0.9 * 2.0 + 0.1 * 0.0)  # 1.8
    assert lecam.ema_fake.item() == pytest.approx(0.9 * -0.5 + 0.1 * 1.0)  # -0.35
    real = torch.tensor([0.0, -1.0], requires_grad=True)
    fake = torch.tensor([1.0, 2.0], requires_grad=True)
    reg = lecam(real, fake)
    # mean(relu([0.35, -0.65])^2) + mean(relu([0.8, -0.2])^2) = 0.1225 / 2 + 0.64 / 2
    assert reg.item() == pytest.approx(0.1225 / 2 + 0.64 / 2)
    reg.backward()
    assert real.grad.tolist() == pytest.approx([0.35, 0.0]) and fake.grad.tolist() == pytest.approx([-0.8, 0.0])
    state = lecam.state_dict()  # the EMAs are state: saved and restored with the discriminator
    other = LeCAM(decay=0.9)
    other.load_state_dict(state)
    assert other.ema_real.item() == pytest.approx(1.8) and int(other.updates) == 2


def test_adaptive_weight_equals_the_hand_computation():
    last = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        last.weight.copy_(torch.tensor([[1.0, 2.0]]))
    y = last(torch.tensor([3.0, 4.0]))[0]  # 11
    rec, g = y ** 2, -3.0 * y  # d rec/dw = 2*11*[3, 4] (norm 110); d g/dw = -3*[3, 4] (norm 15)
    w = adaptive_generator_weight(rec, g, last.weight, base_weight=0.5)
    assert w.item() == pytest.approx(0.5 * 110.0 / (15.0 + 1e-4)) and not w.requires_grad
    rec.backward()  # both graphs are kept for the step's backward
    assert last.weight.grad[0].tolist() == pytest.approx([66.0, 88.0])
    y = last(torch.tensor([3.0, 4.0]))[0]
    assert adaptive_generator_weight(y ** 2, 0.0 * y, last.weight).item() == pytest.approx(1e4)  # clamped


def test_discriminator_is_causal_in_time():
    torch.manual_seed(0)
    disc = CausalDiscriminator3d(channels=8, layers=3).eval()
    x = torch.rand(2, 3, 7, 32, 32) * 2 - 1
    with torch.no_grad():
        base = disc(x)
        assert base.shape == (2, 1, 7, 4, 4)
        for t in (0, 3, 5):
            y = x.clone()
            y[:, :, t + 1:] = torch.rand_like(y[:, :, t + 1:]) * 2 - 1
            out = disc(y)
            assert torch.equal(out[:, :, :t + 1], base[:, :, :t + 1]), f"a future frame changed logits <= {t}"
            assert not torch.equal(out[:, :, t + 1:], base[:, :, t + 1:])


def test_perceptual_loss_equals_the_direct_feature_distance(perceptual_file, tmp_path):
    net, path = perceptual_file
    loss_l2 = PerceptualLoss(load_perceptual_net(path), "l2")
    recon = (torch.rand(2, 3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    target = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    frames = lambda v: v.transpose(1, 2).reshape(6, 3, 16, 16)  # noqa: E731
    with torch.no_grad():
        fa, fb = net(frames(recon)), net(frames(target))
    want_l2 = (F.mse_loss(fa[0], fb[0]) + F.mse_loss(fa[1], fb[1])) / 2
    want_l1 = (F.l1_loss(fa[0], fb[0]) + F.l1_loss(fa[1], fb[1])) / 2
    got = loss_l2(recon, target)
    torch.testing.assert_close(got, want_l2, rtol=1e-5, atol=1e-7)
    assert got.item() > 0 and loss_l2(target, target).item() == 0.0
    torch.testing.assert_close(PerceptualLoss(loss_l2.net, "l1")(recon, target), want_l1, rtol=1e-5, atol=1e-7)
    got.backward()  # the gradient reaches the reconstruction, never the frozen network
    assert recon.grad.abs().sum() > 0 and all(not p.requires_grad for p in loss_l2.net.parameters())
    with pytest.raises(FileNotFoundError, match="tokenizer_train.perceptual_net"):
        load_perceptual_net(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="tokenizer_train.perceptual_net=.*not a loadable TorchScript"):
        load_perceptual_net(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="tokenizer_train.perceptual_net"):
        load_config(None, ["tokenizer_train.perceptual_weight=0.1"])


def records(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "tokenizer/metrics.jsonl").read_text().splitlines()]


def test_training_with_gan_and_perceptual_terms(clips_dir, tmp_path, perceptual_file):
    cfg = load_config(None, TINY + [f"data.clips_dir={clips_dir}", f"run.dir={tmp_path / 'run'}",
                                    "run.tensorboard=false", "tokenizer_train.steps=6", "tokenizer_train.batch_size=2",
                                    "tokenizer_train.log_every=1", "tokenizer_train.eval_every=6",
                                    "tokenizer_train.gan_weight=0.1", "tokenizer_train.gan_start_step=2",
                                    "tokenizer_train.perceptual_weight=0.1",
                                    f"tokenizer_train.perceptual_net={perceptual_file[1]}"])
    train_tokenizer(cfg, progress=False)
    steps = [r for r in records(cfg) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all("d_loss" not in r and "g_loss" not in r for r in steps[:2]), "GAN before gan_start_step"
    for r in steps[2:]:
        for key in ("d_loss", "g_loss", "lecam", "gan_weight_eff"):
            assert torch.isfinite(torch.tensor(r[key])), (r["step"], key, r[key])
        assert r["gan_weight_eff"] > 0
    assert all(r["perceptual"] > 0 for r in steps)
    saved = load_file(cfg.run_dir / "tokenizer" / DISC_WEIGHTS)
    assert int(saved["lecam.updates"]) == 4  # one discriminator step per step after gan_start_step
    init = build_discriminator(cfg.tokenizer_train, cfg.run.seed + 2).state_dict()
    changed = [k for k, v in init.items() if not torch.equal(saved[f"discriminator.{k}"], v)]
    assert "convs.0.conv.weight" in changed and "head.conv.weight" in changed


def test_init_from_a_2d_tokenizer(clips_dir, tmp_path):
    base = TINY + [f"data.clips_dir={clips_dir}", "run.tensorboard=false", "tokenizer_train.log_every=1"]
    cfg2d = load_config(None, base + [f"run.dir={tmp_path / 'tok2d'}", "tokenizer_train.steps=2", *TWO_D])
    ckpt2d = train_tokenizer(cfg2d, progress=False).checkpoint
    tok2d = load_tokenizer(ckpt2d)[0]
    cfg3d = load_config(None, base + [f"run.dir={tmp_path / 'tok3d'}", "tokenizer_train.steps=1",
                                      f"tokenizer_train.init_from={ckpt2d}"])
    held = load_clip_folder(clips_dir, (32, 32), cfg3d.data.frames, progress=False)[-2:]
    x = eval_batch(held, cfg3d.data.frames)
    # in zero mode the inflated 3D tokenizer reconstructs a single frame exactly as the 2D one
    tok3d = VideoTokenizer(cfg3d.tokenizer, cfg3d.quantizer).eval()
    assert init_from_2d(tok3d, cfg3d) == 2
    with torch.no_grad():
        torch.testing.assert_close(tok3d(x[:, :, :1]).recon, tok2d(x[:, :, :1]).recon, rtol=0, atol=1e-5)
    # the training run starts from those weights: its step-0 PSNR on first frames is the 2D tokenizer's
    train_tokenizer(cfg3d, progress=False)
    step0 = next(r for r in records(cfg3d) if r["step"] == 0 and "heldout_psnr" in r)
    want = tokenizer_quality(tok2d, x[:, :, :1])[0]["psnr"]
    assert step0["heldout/psnr_frame0"] == pytest.approx(want, abs=1e-4)
    assert psnr(tok3d(x).recon, x) == pytest.approx(step0["heldout_psnr"], abs=1e-4)
    # random mode: the same last slices, small random earlier ones
    rnd = VideoTokenizer(cfg3d.tokenizer, cfg3d.quantizer)
    init_from_2d(rnd, load_config(None, base + [f"tokenizer_train.init_from={ckpt2d}",
                                                "tokenizer_train.init_mode=random"]))
    w, w2d = rnd.encoder.conv_in.conv.weight, tok2d.encoder.conv_in.conv.weight
    assert torch.equal(w[:, :, -1], w2d[:, :, 0]) and 0 < w[:, :, :-1].abs().max() < 0.01
    with pytest.raises(ValueError, match="tokenizer_train.init_from=.*time_kernel=3, temporal_compression=4"):
        init_from_2d(rnd, load_config(None, base + [f"tokenizer_train.init_from={cfg3d.run_dir}/tokenizer/checkpoint"]))
    with pytest.raises(FileNotFoundError, match="tokenizer_train.init_from="):
        init_from_2d(rnd, load_config(None, base + [f"tokenizer_train.init_from={tmp_path / 'nothing'}"]))
    wide = load_config(None, base + [f"tokenizer_train.init_from={ckpt2d}", "tokenizer.base_channels=16"])
    with pytest.raises(ValueError, match="tokenizer.base_channels: 8 vs 16"):
        init_from_2d(VideoTokenizer(wide.tokenizer, wide.quantizer), wide)
