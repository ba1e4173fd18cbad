"""Rotary position embeddings over one head: Multi-scale Temporal RoPE (DESIGN §3.4) or, for the ablation
(`videoar.rope=flat`), a plain 1-D RoPE over the flattened sequence.

Temporal: three rotary axes (t, h, w); the head_dim/2 frequency pairs are split across them in thirds, the
remainder going to t (*decision*). Flat: one axis holding every pair. Positions come from
`SequenceLayout.positions` ((L, 3) or (L, 1)); pair j of an axis with n pairs rotates by pos * base^(-j/n).
Pairs are adjacent channels (2j, 2j+1).
"""

from __future__ import annotations

import torch


def axis_pairs(head_dim: int, axes: int = 3) -> tuple[int, ...]:
    """Frequency pairs given to each axis: (t, h, w) for 3 axes, all of them for 1 (flat)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    if axes == 1:
        return (pairs,)
    if axes != 3:
        raise ValueError(f"RoPE positions need 3 axes (t, h, w) or 1 (flat), got {axes}")
    third = pairs // 3
    return pairs - 2 * third, third, third


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(L, A) positions -> (L, head_dim/2) rotation angles, axis by axis (A = 3: t's pairs first, then h, then w;
    A = 1: flat 1-D RoPE)."""
    out = []
    for axis, n in enumerate(axis_pairs(head_dim, positions.shape[1])):
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
