"""Multi-scale Temporal RoPE (DESIGN §3.4): three rotary axes (t, h, w) over one head.

The head_dim/2 frequency pairs are split across the axes in thirds, the remainder going to t (*decision*).
Positions come from `SequenceLayout.positions`; pair j of an axis with n pairs rotates by pos * base^(-j/n).
Pairs are adjacent channels (2j, 2j+1).
"""

from __future__ import annotations

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Frequency pairs given to the (t, h, w) axes."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    third = pairs // 3
    return pairs - 2 * third, third, third


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(L, 3) positions -> (L, head_dim/2) rotation angles, axis t's pairs first, then h, then w."""
    out = []
    for axis, n in enumerate(axis_pairs(head_dim)):
        if n == 0:
            continue
        inv_freq = base ** (-torch.arange(n, dtype=torch.float64) / n)
        out.append(positions[:, axis, None].to(torch.float64) * inv_freq[None, :])
    return torch.cat(out, dim=1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (..., L, head_dim) by angles (L, head_dim/2)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
