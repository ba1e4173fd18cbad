"""Token layout of one VideoAR sequence (DESIGN §3.2): condition prefix, then per latent frame its scales coarse
to fine. Everything here is a pure function of (prefix length, frames, scale sizes), so masks, RoPE positions,
losses and the KV-cached sampler all index the sequence the same way; `prev_frame` says what the inputs carry
(models/sequence_inputs.py), so training and sampling build the same features.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from common.model_config import ROPE_MODES


@dataclass(frozen=True)
class Block:
    frame: int
    scale: int
    start: int  # token offset in the full sequence (prefix included)
    height: int
    width: int

    @property
    def end(self) -> int:
        return self.start + self.height * self.width


@dataclass(frozen=True)
class SequenceLayout:
    prefix_len: int
    num_frames: int
    sizes: tuple[tuple[int, int], ...]  # (h_k, w_k) per scale, the last one is the latent grid
    prev_frame: bool = False  # inputs also carry the previous frame's reconstruction (videoar.prev_frame_input)

    def __post_init__(self) -> None:
        if self.prefix_len < 0 or self.num_frames < 1 or not self.sizes:
            raise ValueError(f"invalid layout: prefix_len={self.prefix_len}, num_frames={self.num_frames}, "
                             f"sizes={self.sizes}")

    @property
    def tokens_per_frame(self) -> int:
        return sum(h * w for h, w in self.sizes)

    @property
    def length(self) -> int:
        return self.prefix_len + self.num_frames * self.tokens_per_frame

    @cached_property
    def blocks(self) -> tuple[Block, ...]:
        """(frame, scale) blocks in sequence order: one decoding step of the sampler each."""
        out, start = [], self.prefix_len
        for t in range(self.num_frames):
            for k, (h, w) in enumerate(self.sizes):
                out.append(Block(t, k, start, h, w))
                start += h * w
        return tuple(out)

    def token_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: latent frame index and scale index (both -1 for the condition prefix), shape (L,)."""
        frame = torch.full((self.length,), -1, dtype=torch.long)
        scale = torch.full((self.length,), -1, dtype=torch.long)
        for b in self.blocks:
            frame[b.start:b.end], scale[b.start:b.end] = b.frame, b.scale
        return frame, scale

    def positions(self, rope_stretch: bool = False, rope: str = "temporal", rope_grid: int = 0) -> torch.Tensor:
        """Multi-scale temporal RoPE positions (L, 3) as (t, h, w) (DESIGN §3.4): prefix token i -> (i, i, i);
        video token (frame t, row r, col c) of any scale -> (t+P, r+P, c+P). With `rope_stretch` a coarse scale's
        row/col index is mapped onto the final grid (r * H / h_k) instead of the raw index; `rope_grid` G > 0 measures
        it in cells of a G-row grid over the picture instead (r * G / h_k, c * G * (W / H) / w_k), the same unit at
        every stage resolution.
        `rope="flat"` (`videoar.rope`): plain 1-D positions (L, 1), token i of the sequence -> i."""
        if rope == "flat":
            return torch.arange(self.length, dtype=torch.float32)[:, None]
        if rope != "temporal":
            raise ValueError(f"videoar.rope: {rope!r} is not one of {list(ROPE_MODES)}")
        P, (H, W) = self.prefix_len, self.sizes[-1]
        if rope_grid:
            H, W = rope_grid, rope_grid * W / H
        pos = torch.empty(self.length, 3, dtype=torch.float32)
        pos[:P] = torch.arange(P, dtype=torch.float32)[:, None]
        for b in self.blocks:
            rows = torch.arange(b.height, dtype=torch.float32)
            cols = torch.arange(b.width, dtype=torch.float32)
            if rope_stretch:
                rows, cols = rows * (H / b.height), cols * (W / b.width)
            grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
            pos[b.start:b.end, 0] = b.frame + P
            pos[b.start:b.end, 1] = grid_r.reshape(-1) + P
            pos[b.start:b.end, 2] = grid_c.reshape(-1) + P
        return pos
