"""Block-causal attention mask with the Random Frame Mask (DESIGN §3.3), as booleans (True = may attend).

A token of (frame t, scale k) sees the whole condition prefix, every token of history frames t' < t that are
visible, and frame t's own scales <= k (its own scale bidirectionally). Prefix tokens see only the prefix.
History frame t' is visible to frame t when `t - w <= t' < t` (w <= 0: unlimited) and `m[t'] = 1`,
`m ~ Bernoulli(1 - p_mask)` per sample (training only). Built once per (layout, batch) for
`scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch

from models.layout import SequenceLayout


def frame_visibility(batch: int, num_frames: int, window: int = 0, p_mask: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T, T) bool: may frame t (row) read history frame t' (column)? The diagonal (own frame) is handled by
    the scale rule, so it is False here."""
    if not 0.0 <= p_mask < 1.0:
        raise ValueError(f"p_mask must be in [0, 1), got {p_mask}")
    t = torch.arange(num_frames)
    past = t[None, :] < t[:, None]
    if window > 0:
        past &= t[None, :] >= t[:, None] - window
    keep = torch.rand(batch, num_frames, generator=generator) >= p_mask if p_mask > 0 else \
        torch.ones(batch, num_frames, dtype=torch.bool)
    return past[None] & keep[:, None, :]


def block_causal_mask(layout: SequenceLayout, visibility: torch.Tensor | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool without `visibility`, else (B, L, L) using `frame_visibility`'s (B, T, T) table; built on
    `device` (default: the visibility table's, else the CPU)."""
    device = device if device is not None else (visibility.device if visibility is not None else "cpu")
    frame, scale = (x.to(device) for x in layout.token_ids())
    is_prefix = frame < 0
    qf, kf = frame[:, None], frame[None, :]
    same_frame = (qf == kf) & (scale[None, :] <= scale[:, None]) & ~is_prefix[:, None]
    prefix_key = is_prefix[None, :].expand(layout.length, -1)
    if visibility is None:
        history = (kf >= 0) & (kf < qf)
        return prefix_key | same_frame | history
    if visibility.shape[1:] != (layout.num_frames, layout.num_frames):
        raise ValueError(f"visibility must be (B, {layout.num_frames}, {layout.num_frames}), "
                         f"got {tuple(visibility.shape)}")
    video = ~is_prefix
    qi, ki = frame.clamp(min=0), frame.clamp(min=0)
    history = visibility[:, qi[:, None], ki[None, :]] & video[:, None] & video[None, :]
    return (prefix_key | same_frame)[None] | history
