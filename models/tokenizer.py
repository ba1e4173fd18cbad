"""The 3D multi-scale bitwise video tokenizer: causal conv encoder -> per-frame bitwise quantizer -> decoder.

A clip of 1+T frames maps to 1+T/tau latent frames (the first frame alone, then groups of tau), spatially
compressed by f. Pixel values are floats in [-1, 1], layout (B, 3, T, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.causal_conv import CausalConv3d, Downsample3d, ResBlock3d, StreamCache, Upsample3d, norm
from models.quantizer import MultiScaleBitwiseQuantizer, QuantizerConfig, QuantizerOutput
from common.model_config import TokenizerConfig


class Encoder3d(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, kt = cfg.channels, cfg.time_kernel
        self.conv_in = CausalConv3d(3, ch[0], (kt, 3, 3))
        self.levels = nn.ModuleList()
        for i, temporal in enumerate(cfg.temporal_levels()):
            blocks = nn.ModuleList([ResBlock3d(ch[i], ch[i], kt) for _ in range(cfg.num_res_blocks)])
            self.levels.append(nn.ModuleDict({"blocks": blocks, "down": Downsample3d(ch[i], ch[i + 1], temporal, kt)}))
        self.mid = ResBlock3d(ch[-1], ch[-1], kt)
        self.norm_out = norm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.latent_dim, (kt, 3, 3))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.conv_in(x, cache)
        for level in self.levels:
            for block in level["blocks"]:
                h = block(h, cache)
            h = level["down"](h, cache)
        h = self.mid(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, kt = cfg.channels, cfg.time_kernel
        self.conv_in = CausalConv3d(cfg.latent_dim, ch[-1], (kt, 3, 3))
        self.mid = ResBlock3d(ch[-1], ch[-1], kt)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(cfg.channel_mult))):
            blocks = nn.ModuleList([ResBlock3d(ch[i], ch[i], kt) for _ in range(cfg.num_res_blocks)])
            up = Upsample3d(ch[i + 1], ch[i], cfg.temporal_levels()[i], kt)
            self.levels.append(nn.ModuleDict({"up": up, "blocks": blocks}))
        self.norm_out = norm(ch[0])
        self.conv_out = CausalConv3d(ch[0], 3, (kt, 3, 3))

    def forward(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.mid(self.conv_in(z, cache), cache)
        for level in self.levels:
            h = level["up"](h, cache)
            for block in level["blocks"]:
                h = block(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # (B, 3, T, H, W)
    latent: torch.Tensor  # continuous encoder output (B, d, T', h, w)
    quant: QuantizerOutput  # per latent frame, frames flattened into the batch: (B*T', ...)


class VideoTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, qcfg: QuantizerConfig):
        super().__init__()
        self.cfg, self.qcfg = cfg, qcfg
        self.encoder = Encoder3d(cfg)
        self.decoder = Decoder3d(cfg)
        self.quantizer = MultiScaleBitwiseQuantizer(cfg.latent_dim, qcfg)

    # -- shapes -----------------------------------------------------------------------------------------------
    def latent_frames(self, frames: int) -> int:
        tau = self.cfg.temporal_compression
        if frames < 1 or (frames - 1) % tau:
            raise ValueError(f"clips must have 1 + k*{tau} frames (temporal_compression={tau}), got {frames}")
        return 1 + (frames - 1) // tau

    def check_video(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected video (B, 3, T, H, W), got {tuple(x.shape)}")
        self.latent_frames(x.shape[2])
        f = self.cfg.spatial_compression  # the convolutions take any size divisible by f (curriculum stages)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"frame size {x.shape[-2]}x{x.shape[-1]} must be divisible by spatial_compression={f}")

    # -- continuous latents -----------------------------------------------------------------------------------
    def encode_latent(self, x: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Continuous latents (B, d, T', h, w). With chunk_frames (a multiple of tau) the clip is encoded in
        pieces of 1+chunk_frames, then chunk_frames frames, through the causal stream cache: same result."""
        self.check_video(x)
        if chunk_frames is None or chunk_frames + 1 >= x.shape[2]:
            return self.encoder(x)
        tau = self.cfg.temporal_compression
        if chunk_frames < tau or chunk_frames % tau:
            raise ValueError(f"chunk_frames must be a positive multiple of tau={tau}, got {chunk_frames}")
        cache, outs = StreamCache(), []
        bounds = [0, 1 + chunk_frames]
        while bounds[-1] < x.shape[2]:
            bounds.append(min(bounds[-1] + chunk_frames, x.shape[2]))
        for a, b in zip(bounds[:-1], bounds[1:]):
            outs.append(self.encoder(x[:, :, a:b], cache))
        return torch.cat(outs, dim=2)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    # -- per-frame quantization -------------------------------------------------------------------------------
    @staticmethod
    def frames_to_batch(z: torch.Tensor) -> torch.Tensor:
        b, d, t, h, w = z.shape
        return z.transpose(1, 2).reshape(b * t, d, h, w)

    @staticmethod
    def batch_to_frames(z: torch.Tensor, batch: int) -> torch.Tensor:
        bt, d, h, w = z.shape
        return z.reshape(batch, bt // batch, d, h, w).transpose(1, 2)

    def forward(self, x: torch.Tensor, scale_dropout: float = 0.0) -> TokenizerOutput:
        """Under autocast (bf16 training) the encoder and decoder convs run in bf16; the quantizer's residual sums,
        bit decisions and aux losses, and the returned tensors, stay fp32. `scale_dropout` > 0: each clip, with
        that probability, is decoded from its first k scales only (k uniform in 1..K-1, every latent frame alike;
        `tokenizer_train.scale_dropout`), so that the coarse scales learn to carry what matters most."""
        latent = self.encode_latent(x).float()
        keep = None
        if scale_dropout > 0 and self.quantizer.num_scales > 1:
            b, n, k_all = x.shape[0], latent.shape[2], self.quantizer.num_scales
            short = torch.randint(1, k_all, (b,), device=x.device)
            keep = torch.where(torch.rand(b, device=x.device) < scale_dropout, short, k_all).repeat_interleave(n)
        with torch.autocast(x.device.type, enabled=False):
            quant = self.quantizer(self.frames_to_batch(latent), keep)
        recon = self.decode_latent(self.batch_to_frames(quant.quantized, x.shape[0])).float()
        return TokenizerOutput(recon, latent, quant)

    @torch.no_grad()
    def encode_bits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Bits per scale, each (B*T', d, s_h, s_w) with latent frames flattened into the batch (frame-major
        within each clip)."""
        return self.quantizer.encode(self.frames_to_batch(self.encode_latent(x)))

    @torch.no_grad()
    def decode_bits(self, bits: list[torch.Tensor], batch: int, num_scales: int | None = None) -> torch.Tensor:
        return self.decode_latent(self.batch_to_frames(self.quantizer.decode(bits, num_scales), batch))


@torch.no_grad()
def inflate_from_2d(target: VideoTokenizer, source_state: dict[str, torch.Tensor], mode: str = "zero",
                    seed: int = 0) -> None:
    """Load a 2D (image) tokenizer's weights into a 3D one: each 2D kernel goes into the temporally last slice
    (the current frame under causal padding); the other slices are zero (`mode="zero"`, so a single frame gives
    exactly the 2D result) or small random values (`mode="random"`). Source conv weights may be
    (O, I, kh, kw) or (O, I, 1, kh, kw); every other tensor must match in shape."""
    if mode not in ("zero", "random"):
        raise ValueError(f"inflation mode must be 'zero' or 'random', got {mode!r}")
    gen = torch.Generator().manual_seed(seed)
    own = target.state_dict()
    missing = sorted(set(own) - set(source_state))
    if missing:
        raise KeyError(f"2D tokenizer state lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, dst in own.items():
        src = source_state[name]
        if dst.dim() == 5 and src.dim() in (4, 5):
            src2d = src if src.dim() == 4 else src[:, :, -1]
            if src.dim() == 5 and src.shape[2] != 1 or tuple(src2d.shape) != tuple(dst.shape[:2] + dst.shape[3:]):
                raise ValueError(f"{name}: cannot inflate {tuple(src.shape)} into {tuple(dst.shape)}")
            new = torch.zeros_like(dst) if mode == "zero" else torch.randn(dst.shape, generator=gen) * 1e-3
            new[:, :, -1] = src2d
            dst.copy_(new)
        elif tuple(src.shape) == tuple(dst.shape):
            dst.copy_(src)
        else:
            raise ValueError(f"{name}: shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
