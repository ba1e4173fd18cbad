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


def rope_rotation(angles: torch.Tensor) -> torch.Tensor:
    """(L, head_dim/2) angles -> unit complex numbers e^(i*angle), computed once per layout (not per layer)."""
    angles = angles if angles.dtype == torch.float64 else angles.float()
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x (..., L, head_dim) by `rotation` (L, head_dim/2): complex from
    `rope_rotation`, or real angles. One complex multiply in fp32 (fp64 for fp64 input; 6x faster on CPU than four real ones)."""
    if not rotation.is_complex():
        rotation = rope_rotation(rotation)
    work = x if x.dtype == torch.float64 else x.float()
    pairs = torch.view_as_complex(work.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
