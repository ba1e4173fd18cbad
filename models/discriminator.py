"""A causal 3D PatchGAN discriminator for the tokenizer's GAN term (DESIGN §3.1, paper Eq. 4).

A stack of strided causal 3D convolutions (models/causal_conv.py: time padded in front only, per-frame group
norm) with LeakyReLU(0.2). Space is halved `layers` times, time is never strided, so the output is one logit per
(frame, spatial patch), (B, 1, T, H / 2^layers, W / 2^layers), and logit t reads only frames <= t: the
discriminator respects the same causality as the tokenizer it judges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.causal_conv import CausalConv3d, norm


class CausalDiscriminator3d(nn.Module):
    def __init__(self, channels: int = 16, layers: int = 3, time_kernel: int = 3, max_mult: int = 8):
        super().__init__()
        if channels < 1 or layers < 1 or time_kernel < 1:
            raise ValueError(f"discriminator needs channels, layers, time_kernel >= 1, got {channels}, {layers}, "
                             f"{time_kernel}")
        widths = [channels * min(2 ** i, max_mult) for i in range(layers)]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = 3
        for i, c_out in enumerate(widths):
            self.convs.append(CausalConv3d(c_in, c_out, (time_kernel, 3, 3), stride=(1, 2, 2)))
            # no norm on the first layer (PatchGAN); per-frame norms after, so normalization cannot leak the future
            self.norms.append(nn.Identity() if i == 0 else norm(c_out))
            c_in = c_out
        self.head = CausalConv3d(c_in, 1, (time_kernel, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Videos (B, 3, T, H, W) in [-1, 1] -> patch logits (B, 1, T, h, w)."""
        h = x
        for conv, nrm in zip(self.convs, self.norms):
            h = F.leaky_relu(nrm(conv(h)), 0.2)
        return self.head(h)
