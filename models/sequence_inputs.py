"""Teacher-forced inputs and targets of a VideoAR sequence (DESIGN §3.2), from per-scale bits of whole clips.

Input of (frame t, scale k): k >= 1: `next_input(acc_{<k}[t], k)`, the frame's own reconstruction so far;
k = 0, t > 0: `next_input(acc_full[t-1], 0)`, the previous frame's full reconstruction; k = 0, t = 0: the SOS
slot (zeros here, the model puts its learned SOS embedding there). With `prev_frame` (videoar.prev_frame_input)
every input is followed by `next_input(acc_full[t-1], k)` (zeros for t = 0): the previous frame at the block's
own size, so a token sees what was at its place a frame ago without attending for it (d -> 2d features). The
sampler builds the same inputs one block at a time with the same two quantizer functions, so training and
sampling cannot disagree.
Tokens of a block are in row-major (h, w) order, like `SequenceLayout.positions`.
"""

from __future__ import annotations

import torch

from models.quantizer import MultiScaleBitwiseQuantizer


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, d, h, w) -> (N, h*w, d)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, h*w, d) -> (N, d, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def block_input(q: MultiScaleBitwiseQuantizer, k: int, acc: torch.Tensor | None,
                prev_frame: torch.Tensor | None, with_prev: bool = False) -> torch.Tensor:
    """Input tokens (N, h_k*w_k, d) of scale k, given the frame's reconstruction so far `acc` (k >= 1) and the
    previous frame's full reconstruction `prev_frame` (k = 0; None on frame 0 gives the zero SOS slot);
    `with_prev` (layout.prev_frame): (N, h_k*w_k, 2d), the previous frame at scale k's size appended."""
    previous = None  # the previous frame at scale k's size (zeros before the first frame), when needed
    if k == 0 or with_prev:
        n, (h, w) = (acc.shape[0] if acc is not None else 1), q.sizes[k]
        previous = torch.zeros(n, h * w, q.dim, dtype=q.dtype, device=q.device) if prev_frame is None \
            else grid_to_tokens(q.next_input(prev_frame, k))
    x = grid_to_tokens(q.next_input(acc, k)) if k > 0 else previous
    return torch.cat([x, previous], dim=-1) if with_prev else x


@torch.no_grad()
def teacher_forcing_features(q: MultiScaleBitwiseQuantizer, bits: list[torch.Tensor], prev_frame: bool = False
                             ) -> torch.Tensor:
    """Features (B, T * tokens_per_frame, d) for per-scale input bits [(B, T, d, h_k, w_k)], e.g. the
    flipped `ErrorCorrectedBits.inputs` (or the clean bits for plain teacher forcing); (..., 2d) with
    `prev_frame` (layout.prev_frame)."""
    b, t = bits[0].shape[:2]
    flat = [x.flatten(0, 1) for x in bits]  # (B*T, d, h_k, w_k): all frames at once
    acc = q._empty_recon(flat)
    per_scale = [None] * q.num_scales
    for k in range(q.num_scales):
        if k > 0:
            per_scale[k] = grid_to_tokens(q.next_input(acc, k))
        acc = q.add_scale(acc, flat[k], k)
    full = acc.view(b, t, *acc.shape[1:])  # each frame's full reconstruction
    before = torch.cat([torch.zeros_like(full[:, :1]), full[:, :-1]], dim=1).flatten(0, 1)  # zeros before frame 0
    per_scale[0] = grid_to_tokens(q.next_input(before, 0))
    frames = torch.cat([x.view(b, t, -1, q.dim) for x in per_scale], dim=2)  # (B, T, tokens_per_frame, d)
    if prev_frame:
        prev = [grid_to_tokens(q.next_input(before, k)).view(b, t, -1, q.dim) for k in range(q.num_scales)]
        frames = torch.cat([frames, torch.cat(prev, dim=2)], dim=-1)
    return frames.flatten(1, 2)


def sequence_targets(labels: list[torch.Tensor]) -> torch.Tensor:
    """Target bits (B, T * tokens_per_frame, d) from per-scale labels [(B, T, d, h_k, w_k)]."""
    b, t = labels[0].shape[:2]
    per_scale = [grid_to_tokens(x.flatten(0, 1)).view(b, t, -1, x.shape[2]) for x in labels]
    return torch.cat(per_scale, dim=2).flatten(1, 2)


def split_frames_scales(tokens: torch.Tensor, num_frames: int, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of `sequence_targets`: (B, T * tokens_per_frame, d) -> per-scale [(B, T, d, h_k, w_k)]."""
    b, _, d = tokens.shape
    frames = tokens.view(b, num_frames, -1, d)
    out, start = [], 0
    for h, w in sizes:
        x = frames[:, :, start:start + h * w]
        out.append(tokens_to_grid(x.flatten(0, 1), h, w).view(b, num_frames, d, h, w))
        start += h * w
    return out
