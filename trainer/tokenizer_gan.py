"""Wiring of the tokenizer objective's optional terms into tokenizer training (the math is in
models/tokenizer_losses.py and models/discriminator.py).

`TokenizerGan` builds the objective from `tokenizer_train` (the discriminator only when gan_weight > 0, the
perceptual network only when perceptual_weight > 0, so the defaults build nothing and draw no random numbers),
gives the generator loss of a step, and runs the discriminator's own optimizer step after `gan_start_step`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from common.atomic import atomic_write_bytes
from common.train_config import TokenizerTrainConfig
from models.discriminator import CausalDiscriminator3d
from models.tokenizer import TokenizerOutput, VideoTokenizer
from models.tokenizer_losses import PerceptualLoss, TokenizerObjective, load_perceptual_net

DISC_WEIGHTS = "discriminator.safetensors"  # beside the tokenizer checkpoint dir: discriminator + LeCAM EMAs


def build_discriminator(t: TokenizerTrainConfig, seed: int) -> CausalDiscriminator3d:
    """The discriminator of `t`, initialised from its own seed (so it neither depends on nor shifts the global RNG
    stream the tokenizer's training draws from)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalDiscriminator3d(t.disc_channels, t.disc_layers)


class TokenizerGan:
    def __init__(self, t: TokenizerTrainConfig, model: VideoTokenizer, device: str, seed: int):
        self.t = t
        perceptual = None
        if t.perceptual_weight > 0:
            net = load_perceptual_net(t.perceptual_net, device, key="tokenizer_train.perceptual_net")
            perceptual = PerceptualLoss(net, t.perceptual_distance)
        disc = build_discriminator(t, seed + 2) if t.gan_weight > 0 else None
        self.objective = TokenizerObjective(t, disc, perceptual).to(device)
        self.last_layer = model.decoder.conv_out.conv.weight  # where the adaptive weight compares gradients
        self.opt = None
        if disc is not None:
            self.opt = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr, betas=tuple(t.disc_betas),
                                         weight_decay=0.0)

    @property
    def discriminator(self) -> CausalDiscriminator3d | None:
        return self.objective.discriminator

    def active(self, step: int) -> bool:
        """The GAN term applies at this (1-based) step: a discriminator exists and the warm-up is over."""
        return self.discriminator is not None and step > self.t.gan_start_step

    def generator_loss(self, out: TokenizerOutput, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        return self.objective.generator_loss(out, x, self.last_layer, gan=self.active(step))

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> dict[str, float]:
        """One optimizer step of the discriminator on real clips vs (detached) reconstructions; {} before
        gan_start_step or without a discriminator."""
        if not self.active(step):
            return {}
        loss, parts = self.objective.discriminator_loss(real, fake.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.t.grad_clip:
            parts["d_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(),
                                                                        self.t.grad_clip))
        self.opt.step()
        return parts

    def save(self, directory: Path, step: int) -> Path | None:
        """The discriminator and its LeCAM state as safetensors (no resume reads it yet); None without one."""
        if self.discriminator is None:
            return None
        state = {f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}
        state.update({f"lecam.{k}": v for k, v in self.objective.lecam.state_dict().items()})
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        path = Path(directory) / DISC_WEIGHTS
        atomic_write_bytes(path, save(state, metadata={"step": str(step)}))
        return path
