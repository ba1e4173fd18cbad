"""The tokenizer objective, paper Eq. 4: reconstruction + perceptual + GAN (hinge, LeCAM) + commitment + entropy.

    L = l1*|x^ - x| + l2*(x^ - x)^2 + p*perceptual(x^, x) + lambda_G * (-D(x^)) + commit + entropy   (generator)
    L_D = hinge(D(x), D(x^)) + lecam_weight * LeCAM(D(x), D(x^))                                      (discriminator)

lambda_G is either `gan_weight` or, with `adaptive_gan_weight`, the VQGAN/MAGVIT adaptive weight
gan_weight * ||dL_rec/dW|| / (||dL_G/dW|| + 1e-4), clamped to [0, 1e4], with W the decoder's last conv kernel and
L_rec the reconstruction + perceptual terms. The perceptual network is a TorchScript file the user supplies (none
ships; nothing is downloaded). The trainer only wires these pieces (trainer/tokenizer_gan.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.train_config import TokenizerTrainConfig
from models.tokenizer import TokenizerOutput

ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4


# -- GAN losses -------------------------------------------------------------------------------------------------
def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))) (VQGAN's hinge discriminator loss)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean(D(fake)): the generator raises the discriminator's score of its reconstructions."""
    return -fake_logits.mean()


class LeCAM(nn.Module):
    """LeCAM regularization (Yu et al. 2021) with its EMA state (buffers: saved with the discriminator).

    update(): ema <- decay * ema + (1 - decay) * mean(logits), for real and fake; the first update sets the EMAs to
    the current means (no bias towards 0). forward(): mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real -
    D(fake))^2), with the EMAs as constants.
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCAM EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        decay = self.decay if int(self.updates) > 0 else 0.0
        self.ema_real.mul_(decay).add_((1.0 - decay) * real_logits.detach().float().mean())
        self.ema_fake.mul_(decay).add_((1.0 - decay) * fake_logits.detach().float().mean())
        self.updates.add_(1)

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.relu(real_logits - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake_logits).pow(2).mean()


def adaptive_generator_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              base_weight: float = 1.0) -> torch.Tensor:
    """base * clamp(||d rec/d W|| / (||d g/d W|| + 1e-4), 0, 1e4), detached (VQGAN, MAGVIT). Keeps both graphs."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach() * base_weight


# -- perceptual loss --------------------------------------------------------------------------------------------
def load_perceptual_net(path: str | Path, device: str | torch.device = "cpu",
                        key: str = "tokenizer_train.perceptual_net") -> torch.jit.ScriptModule:
    """A frozen TorchScript feature network (frames (N, 3, H, W) in [-1, 1] -> a tensor or a list of tensors);
    errors name the config `key` that gave the path."""
    p = Path(path)
    if not str(path) or not p.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file; give a TorchScript feature network saved with "
                                f"torch.jit.save (none ships), or set the perceptual weight to 0")
    try:
        net = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{key}={str(path)!r}: not a loadable TorchScript file ({first})") from None
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


class PerceptualLoss(nn.Module):
    """Mean feature distance of a frozen network between reconstructed and target frames: the average over the
    network's feature tensors of mean((f(x^) - f(x))^2) (`l2`) or mean(|f(x^) - f(x)|) (`l1`). Videos
    (B, 3, T, H, W) are judged frame by frame; frames (N, 3, H, W) are taken as they are."""

    def __init__(self, net: nn.Module, distance: str = "l2"):
        super().__init__()
        if distance not in ("l1", "l2"):
            raise ValueError(f"perceptual distance must be 'l1' or 'l2', got {distance!r}")
        self.net, self.distance = net, distance

    @staticmethod
    def frames(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            b, c, t, h, w = x.shape
            return x.transpose(1, 2).reshape(b * t, c, h, w)
        return x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(self.frames(x))
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.features(target)
        got = self.features(recon)
        if len(got) != len(ref) or not got:
            raise ValueError(f"perceptual network returned {len(got)} vs {len(ref)} feature tensors")
        dist = F.mse_loss if self.distance == "l2" else F.l1_loss
        return torch.stack([dist(a, b) for a, b in zip(got, ref)]).mean()


# -- the whole objective ----------------------------------------------------------------------------------------
class TokenizerObjective(nn.Module):
    """Eq. 4 with the weights of `tokenizer_train`; the discriminator and the perceptual loss are optional (None =
    the term is off, as at the defaults, where the loss is exactly l1 + l2 + commitment + entropy)."""

    def __init__(self, t: TokenizerTrainConfig, discriminator: nn.Module | None = None,
                 perceptual: PerceptualLoss | None = None):
        super().__init__()
        self.t = t
        self.discriminator, self.perceptual = discriminator, perceptual
        self.lecam = LeCAM(t.lecam_decay) if discriminator is not None else None

    def reconstruction(self, out: TokenizerOutput, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        l1, l2 = F.l1_loss(out.recon, x), F.mse_loss(out.recon, x)
        rec = self.t.l1_weight * l1 + self.t.l2_weight * l2
        terms = {"l1": l1, "l2": l2}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(out.recon, x)
            rec = rec + self.t.perceptual_weight * terms["perceptual"]
        return rec, terms

    def generator_loss(self, out: TokenizerOutput, x: torch.Tensor, last_layer: torch.Tensor | None = None,
                       gan: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """(generator loss, logged parts). `gan`: add the hinge generator term (needs the discriminator; with
        `adaptive_gan_weight`, `last_layer` is the decoder's last kernel)."""
        t = self.t
        rec, terms = self.reconstruction(out, x)
        loss = rec + t.commit_weight * out.quant.commit_loss + t.entropy_weight * out.quant.entropy_loss
        parts = {k: v.item() for k, v in terms.items()}
        if gan:
            if self.discriminator is None:
                raise ValueError("the GAN term needs a discriminator (tokenizer_train.gan_weight > 0)")
            self.discriminator.requires_grad_(False)  # the generator's loss trains the tokenizer only
            try:
                g = hinge_g_loss(self.discriminator(out.recon))
            finally:
                self.discriminator.requires_grad_(True)
            weight = adaptive_generator_weight(rec, g, last_layer, t.gan_weight) if t.adaptive_gan_weight else \
                torch.tensor(t.gan_weight)
            loss = loss + weight * g
            parts.update(g_loss=g.item(), gan_weight_eff=float(weight))
        parts = {"loss": loss.item(), **parts, "commit": out.quant.commit_loss.item(),
                 "entropy": out.quant.entropy_loss.item()}
        return loss, parts

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss + LeCAM on real clips and (detached) reconstructions; updates the LeCAM EMAs first."""
        if self.discriminator is None:
            raise ValueError("no discriminator (tokenizer_train.gan_weight = 0)")
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake.detach())
        hinge = hinge_d_loss(real_logits, fake_logits)
        self.lecam.update(real_logits, fake_logits)
        reg = self.lecam(real_logits, fake_logits)
        loss = hinge + self.t.lecam_weight * reg
        return loss, {"d_loss": loss.item(), "d_hinge": hinge.item(), "lecam": reg.item(),
                      "logits_real": real_logits.mean().item(), "logits_fake": fake_logits.mean().item()}
