"""Causal 3D convolution building blocks for the video tokenizer.

Causality is the contract that lets long videos be encoded chunk by chunk: every op here looks only at the
current and past frames. Time padding goes in front only, normalization is per frame, and temporal
up-sampling never reads the future. `StreamCache` carries each conv's unconsumed tail between chunks, so
encoding a clip in pieces equals encoding it whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StreamCache(dict):
    """Per-module leftover input frames between chunks of one stream (keyed by module id)."""


class CausalConv3d(nn.Module):
    """Conv3d that pads only the past in time (replicating the first frame) and streams across chunks.

    With temporal stride s and kernel k, output j reads padded frames [j*s, j*s+k). Between chunks we keep the
    padded frames from (number of outputs)*s onwards, which is exactly what the next output needs, so any split of
    the input into chunks that keeps stride alignment gives the same outputs as one pass.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int, int] = 3,
                 stride: int | tuple[int, int, int] = 1):
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        st, sh, sw = (stride,) * 3 if isinstance(stride, int) else stride
        self.time_kernel, self.time_stride = kt, st
        self.space_pad = (kw // 2, kw // 2, kh // 2, kh // 2)
        self.conv = nn.Conv3d(in_ch, out_ch, (kt, kh, kw), stride=(st, sh, sw))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        key = id(self)
        if cache is not None and key in cache:
            x = torch.cat([cache[key], x], dim=2)
        else:
            pad = self.time_kernel - 1
            if pad:
                x = torch.cat([x[:, :, :1].expand(-1, -1, pad, -1, -1), x], dim=2)
        if x.shape[2] < self.time_kernel:
            raise ValueError(f"causal conv needs >= {self.time_kernel} frames after padding, got {x.shape[2]}")
        n_out = (x.shape[2] - self.time_kernel) // self.time_stride + 1
        if cache is not None:
            cache[key] = x[:, :, n_out * self.time_stride:]
        x = F.pad(x, self.space_pad)
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame separately: normalizing over time would leak the future."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def norm(ch: int) -> FrameGroupNorm:
    return FrameGroupNorm(num_groups=min(32, ch // 4) if ch >= 4 else 1, num_channels=ch, eps=1e-6)


class ResBlock3d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_kernel: int):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), CausalConv3d(in_ch, out_ch, (time_kernel, 3, 3))
        self.norm2, self.conv2 = norm(out_ch), CausalConv3d(out_ch, out_ch, (time_kernel, 3, 3))
        self.skip = CausalConv3d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return h + (self.skip(x, cache) if self.skip is not None else x)


class Downsample3d(nn.Module):
    """Stride-2 conv in space, and in time when `temporal` (1+2n frames -> 1+n frames, causally)."""

    def __init__(self, ch_in: int, ch_out: int, temporal: bool, time_kernel: int):
        super().__init__()
        self.conv = CausalConv3d(ch_in, ch_out, (time_kernel, 3, 3), stride=(2 if temporal else 1, 2, 2))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.conv(x, cache)


class Upsample3d(nn.Module):
    """Nearest 2x in space; in time, latent frame 0 -> 1 frame and every later frame -> 2 (1+n -> 1+2n)."""

    def __init__(self, ch_in: int, ch_out: int, temporal: bool, time_kernel: int):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(ch_in, ch_out, (time_kernel, 3, 3))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if self.temporal:
            x = x.repeat_interleave(2, dim=2)
            first_chunk = cache is None or id(self) not in cache
            if first_chunk:
                x = x[:, :, 1:]
            if cache is not None:
                cache[id(self)] = True
        b, c, t, h, w = x.shape
        x = F.interpolate(x.reshape(b, c * t, h, w), scale_factor=2, mode="nearest").reshape(b, c, t, 2 * h, 2 * w)
        return self.conv(x, cache)
