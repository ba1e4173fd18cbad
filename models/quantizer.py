"""Multi-scale residual bitwise quantizer (DESIGN §3.1), one latent frame at a time.

The encode path, the teacher-forcing input path and the inference input path all go through the same two
functions, `add_scale` (accumulate one scale's code into the full-resolution reconstruction) and `next_input`
(what the transformer sees before predicting a scale), so they cannot drift apart (the VAR pattern).

Per scale k with side s_k:   r_k = down(residual, s_k);  u = r_k / ||r_k||;  bits = u > 0;
                             code = g(s_k) (2 bits - 1) / sqrt(d);  residual -= up(code)
`quantizer.gain=fixed` (the default): g = 1, the paper's and Infinity's codes +-1/sqrt(d), so a flipped bit moves
the reconstruction by the same amount at every scale and Cross-Frame Error Correction's ratios mean the same thing
everywhere. `learned`: a positive gain per side length (initialised g_0 * decay^k over the tokenizer's own
schedule), keyed by the side, so a curriculum stage with another schedule uses the gain fitted for each side it
shares with the tokenizer's; the gains are part of the decoder, so tokens stay pure bits either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.model_config import QuantizerConfig


@dataclass
class ErrorCorrectedBits:
    """Cross-Frame Error Correction targets for clips (DESIGN §3.6); lists hold one entry per scale."""
    labels: list[torch.Tensor]  # (B, T, d, s_h, s_w) bool: bits of the residual against the corrupted reconstruction
    inputs: list[torch.Tensor]  # (B, T, d, s_h, s_w) bool: the flipped bits that build the next inputs
    ratios: torch.Tensor  # (B, T, K) flip ratio drawn per sample, frame and scale
    recon: torch.Tensor  # (B, T, d, h, w) corrupted accumulated reconstruction of every frame


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (N, d, h, w): value of the reconstruction, gradient straight through to the input
    bits: list[torch.Tensor]  # per scale (N, d, s_h, s_w) bool
    commit_loss: torch.Tensor
    entropy_loss: torch.Tensor


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=mode, **kwargs)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class MultiScaleBitwiseQuantizer(nn.Module):
    def __init__(self, dim: int, cfg: QuantizerConfig):
        super().__init__()
        self.dim, self.cfg = dim, cfg
        self.sizes = cfg.sizes
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # dtype and device of the codes
        self.gain_slot: dict[tuple[int, int], int] = {}  # side -> entry of log_gain (learned gains only)
        for s in self.sizes:
            self.gain_slot.setdefault(tuple(s), len(self.gain_slot))
        if cfg.gain == "learned":
            init = [math.log(cfg.gain_init * cfg.gain_decay**k) for k in range(len(self.gain_slot))]
            self.log_gain = nn.Parameter(torch.tensor(init, dtype=torch.float32))
        else:
            self.log_gain = None
        self.gain_index = [self.gain_slot[tuple(s)] for s in self.sizes]

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def num_scales(self) -> int:
        return len(self.sizes)

    def for_sizes(self, sizes: list[tuple[int, int]]) -> "MultiScaleBitwiseQuantizer":
        """A view of this quantizer on another scale schedule (a curriculum stage's grid). Learned gains are
        shared by side length: every side of the stage must be one of the tokenizer's."""
        sizes = [tuple(map(int, s)) for s in sizes]
        if not 1 <= len(sizes) <= self.num_scales:
            raise ValueError(f"a stage may use 1..{self.num_scales} scales (the tokenizer's), got {len(sizes)}")
        unknown = [s for s in sizes if s not in self.gain_slot]
        if self.log_gain is not None and unknown:
            raise ValueError(f"scale sides {unknown} have no learned gain: the tokenizer was trained on "
                             f"{[s[0] if s[0] == s[1] else s for s in self.sizes]} (quantizer.gain=learned keys gains "
                             f"by side); use those sides or a tokenizer with quantizer.gain=fixed")
        view = MultiScaleBitwiseQuantizer.__new__(MultiScaleBitwiseQuantizer)
        nn.Module.__init__(view)
        view.dim, view.cfg, view.sizes, view.gain_slot = self.dim, self.cfg, sizes, self.gain_slot
        view.register_buffer("anchor", self.anchor, persistent=False)
        view.log_gain = self.log_gain  # shared Parameter (or None)
        view.gain_index = [self.gain_slot.get(s, -1) for s in sizes]
        return view

    def gain(self, k: int) -> torch.Tensor | float:
        """g of scale k: 1 for fixed codes, else the learned gain of its side."""
        return 1.0 if self.log_gain is None else self.log_gain[self.gain_index[k]].exp()

    # -- bits, codes and indices ---------------------------------------------------------------------------
    def code(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        """Bits of scale k -> its code vectors g(s_k) (2b - 1) / sqrt(d)."""
        return (bits.to(self.dtype) * 2 - 1) * (self.gain(k) / math.sqrt(self.dim))

    @staticmethod
    def code_to_bits(code: torch.Tensor) -> torch.Tensor:
        return code > 0

    @staticmethod
    def bits_to_index(bits: torch.Tensor) -> torch.Tensor:
        """(N, d, ...) bool -> (N, ...) int64 token ids (bit c has weight 2^c); d <= 63."""
        d = bits.shape[1]
        if d > 63:
            raise ValueError(f"bits_to_index supports d <= 63 bits per token, got {d}")
        weights = (2 ** torch.arange(d, dtype=torch.int64, device=bits.device)).view(1, d, *([1] * (bits.dim() - 2)))
        return (bits.to(torch.int64) * weights).sum(1)

    @staticmethod
    def index_to_bits(index: torch.Tensor, d: int) -> torch.Tensor:
        shifts = torch.arange(d, dtype=torch.int64, device=index.device).view(1, d, *([1] * (index.dim() - 1)))
        return (index.unsqueeze(1) >> shifts) & 1 == 1

    # -- the two shared steps --------------------------------------------------------------------------------
    def add_scale(self, acc: torch.Tensor, bits: torch.Tensor, k: int) -> torch.Tensor:
        """acc + up(code(bits_k)): the accumulated full-resolution reconstruction after scale k."""
        return acc + _resize(self.code(bits, k), tuple(acc.shape[-2:]), self.cfg.up)

    def next_input(self, acc: torch.Tensor, k: int) -> torch.Tensor:
        """What the transformer sees before predicting scale k: the reconstruction so far, at scale k's size."""
        return _resize(acc, self.sizes[k], self.cfg.down)

    def quantize_scale(self, residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bits of scale k for a full-resolution residual, and the unit-normalised down-sampled residual u."""
        u = F.normalize(_resize(residual, self.sizes[k], self.cfg.down), dim=1)
        return u > 0, u

    # -- encode / decode (the training and sampling inputs are built in models/sequence_inputs.py) -------------
    def forward(self, f: torch.Tensor, keep: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize frames f (N, d, h, w) over all scales, with straight-through gradients and aux losses.
        `keep` (N,) scale counts: item i's `quantized` is its reconstruction from its first keep[i] scales (nested
        scale dropout in tokenizer training); the bits and aux losses still cover every scale."""
        self._check_grid(f)
        acc = torch.zeros_like(f)
        bits_all, entropy, prefix = [], f.new_zeros(()), None
        for k in range(self.num_scales):
            bits, u = self.quantize_scale(f - acc.detach(), k)
            acc = self.add_scale(acc, bits, k)
            if keep is not None:
                prefix = acc if prefix is None else torch.where((keep > k).view(-1, 1, 1, 1), acc, prefix)
            bits_all.append(bits)
            prob = torch.sigmoid(u * math.sqrt(self.dim) * (2.0 / self.cfg.entropy_temperature))
            per_token = _binary_entropy(prob).mean()
            batch = _binary_entropy(prob.mean(dim=(0, 2, 3))).mean()
            entropy = entropy + per_token - self.cfg.entropy_batch_weight * batch
        # commitment pulls the encoder to its codes; the second term fits learned gains to the latent (with fixed
        # codes it carries no gradient)
        commit = F.mse_loss(f, acc.detach()) + F.mse_loss(acc, f.detach())
        quantized = (acc if prefix is None else prefix) + (f - f.detach())
        return QuantizerOutput(quantized, bits_all, commit, entropy / self.num_scales)

    @torch.no_grad()
    def encode(self, f: torch.Tensor) -> list[torch.Tensor]:
        self._check_grid(f)
        acc, bits_all = torch.zeros_like(f), []
        for k in range(self.num_scales):
            bits, _ = self.quantize_scale(f - acc, k)
            acc = self.add_scale(acc, bits, k)
            bits_all.append(bits)
        return bits_all

    def decode(self, bits: list[torch.Tensor], num_scales: int | None = None) -> torch.Tensor:
        """Reconstruction from the first `num_scales` scales (default: all given)."""
        n = len(bits) if num_scales is None else num_scales
        if not 1 <= n <= min(len(bits), self.num_scales):
            raise ValueError(f"num_scales must be in 1..{min(len(bits), self.num_scales)}, got {n}")
        acc = self._empty_recon(bits)
        for k in range(n):
            acc = self.add_scale(acc, bits[k], k)
        return acc

    @torch.no_grad()
    def encode_with_error_correction(self, f: torch.Tensor, p_max: float, p_min: float = 0.0, delta: float = 0.01,
                                     generator: torch.Generator | None = None, inherit: bool = True
                                     ) -> ErrorCorrectedBits:
        """Cross-Frame Error Correction on clips f (B, T, d, h, w), DESIGN §3.6:

            lo, hi = p_min + delta*t, p_max + delta*t
            p = U(max(lo, p_prev_final), hi) if inherit and k == 0 and t > 0 else U(lo, hi)
            label = bits(down(F[t] - acc, s_k)); noisy = label XOR Bernoulli(p); acc += up(code(noisy))

        p_prev_final is the ratio of the previous frame's last scale (which is corrupted too). `inherit=False`
        (`videoar_train.flip_inherit`, the ablation) draws U(lo, hi) at every scale; the random draws are the same
        in number and order either way. With p_max = p_min = delta = 0 this is exactly `encode` (plain teacher
        forcing).
        """
        if not 0.0 <= p_min <= p_max <= 1.0 or delta < 0:
            raise ValueError(f"flip ratios need 0 <= p_min <= p_max <= 1 and delta >= 0, "
                             f"got p_min={p_min}, p_max={p_max}, delta={delta}")
        b, t_frames = f.shape[:2]
        self._check_grid(f[:, 0])
        K = self.num_scales
        ratios = torch.zeros(b, t_frames, K, dtype=torch.float64)
        labels = [f.new_zeros(b, t_frames, self.dim, *s, dtype=torch.bool) for s in self.sizes]
        inputs = [torch.zeros_like(x) for x in labels]
        recon = torch.zeros_like(f)
        p_prev = torch.zeros(b, dtype=torch.float64)
        for t in range(t_frames):
            lo, hi = min(1.0, p_min + delta * t), min(1.0, p_max + delta * t)
            acc = torch.zeros_like(f[:, t])
            for k in range(K):
                floor = torch.maximum(torch.full_like(p_prev, lo), p_prev) if (inherit and k == 0 and t > 0) else \
                    torch.full_like(p_prev, lo)
                p = floor + (hi - floor) * torch.rand(b, generator=generator, dtype=torch.float64)
                label, _ = self.quantize_scale(f[:, t] - acc, k)
                # drawn on the generator's device (the CPU: seeded per sample, the same on every layout), then moved
                u = torch.rand(label.shape, generator=generator, dtype=torch.float64)
                noisy = label ^ (u < p.view(b, 1, 1, 1)).to(label.device)
                acc = self.add_scale(acc, noisy, k)
                labels[k][:, t], inputs[k][:, t], ratios[:, t, k] = label, noisy, p
            p_prev = ratios[:, t, K - 1]
            recon[:, t] = acc
        return ErrorCorrectedBits(labels, inputs, ratios, recon)

    def _empty_recon(self, bits: list[torch.Tensor]) -> torch.Tensor:
        b = bits[0]
        return torch.zeros(b.shape[0], self.dim, *self.sizes[-1], dtype=self.dtype, device=b.device)

    def _check_grid(self, f: torch.Tensor) -> None:
        if tuple(f.shape[-2:]) != self.sizes[-1] or f.shape[1] != self.dim:
            raise ValueError(f"quantizer expects (N, {self.dim}, {self.sizes[-1][0]}, {self.sizes[-1][1]}) latents "
                             f"(the last scale is the latent grid), got {tuple(f.shape)}")
