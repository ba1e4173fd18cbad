"""Sequence layout, block-causal + Random Frame Mask visibility (DESIGN §3.3) and Multi-scale Temporal RoPE
positions (DESIGN §3.4; and the flat 1-D RoPE of the ablation), each checked against tables written out by hand
from the spec."""

from __future__ import annotations

import math

import pytest
import torch

from common.model_config import VideoARConfig
from models.attention_mask import block_causal_mask, frame_visibility
from models.layout import SequenceLayout
from models.rope import apply_rope, axis_pairs, rope_angles

# prefix of 2 tokens, 3 latent frames, scales 1x1 and 2x2 -> blocks: prefix, (0,0) (0,1) (1,0) (1,1) (2,0) (2,1)
LAYOUT = SequenceLayout(prefix_len=2, num_frames=3, sizes=((1, 1), (2, 2)))
BLOCKS = ["P", "00", "01", "10", "11", "20", "21"]


def block_table(mask: torch.Tensor) -> list[str]:
    """Collapse an (L, L) token mask to a block x block table of '1'/'0'/'?' ('?' = mixed inside a block)."""
    spans = [(0, 2)] + [(b.start, b.end) for b in LAYOUT.blocks]
    rows = []
    for qa, qb in spans:
        row = ""
        for ka, kb in spans:
            sub = mask[qa:qb, ka:kb]
            row += "1" if sub.all() else "0" if not sub.any() else "?"
        rows.append(row)
    return rows


def test_layout_counts_and_paper_setting():
    assert LAYOUT.tokens_per_frame == 5 and LAYOUT.length == 17
    assert [(b.frame, b.scale, b.start, b.end) for b in LAYOUT.blocks][:3] == [(0, 0, 2, 3), (0, 1, 3, 7), (1, 0, 7, 8)]
    ucf = SequenceLayout(0, 5, tuple((s, s) for s in (1, 2, 3, 4, 6, 8)))
    assert ucf.tokens_per_frame == 130 and ucf.length == 650 and len(ucf.blocks) == 30


def test_block_causal_table_without_frame_mask():
    expected = [  # rows: query block, columns: key block (P 00 01 10 11 20 21)
        "1000000",  # prefix sees the prefix only
        "1100000",  # frame 0 scale 0
        "1110000",  # frame 0 scale 1: own frame's scales <= 1
        "1111000",  # frame 1 scale 0: prefix + all of frame 0 + itself
        "1111100",
        "1111110",
        "1111111",
    ]
    assert block_table(block_causal_mask(LAYOUT)) == expected


def test_block_causal_table_with_random_frame_mask():
    # m = [0, 1, 1]: frame 0 hidden from later frames; window w=1: frame 2 may read only frame 1
    vis = frame_visibility(1, 3, window=1)
    vis &= torch.tensor([False, True, True])[None, None, :]
    expected = [
        "1000000",
        "1100000",
        "1110000",
        "1001000",  # frame 1: frame 0 masked out, prefix and own scale stay visible
        "1001100",
        "1001110",  # frame 2: frame 0 outside the window (and masked), frame 1 visible
        "1001111",
    ]
    assert block_table(block_causal_mask(LAYOUT, vis)[0]) == expected
    window_only = block_table(block_causal_mask(LAYOUT, frame_visibility(1, 3, window=1))[0])
    assert window_only[3:] == ["1111000", "1111100", "1001110", "1001111"]  # w=1 alone hides frame 0 from 2 only
    unlimited = frame_visibility(1, 3, window=0)
    assert torch.equal(block_causal_mask(LAYOUT, unlimited)[0], block_causal_mask(LAYOUT))


def test_frame_mask_rate_and_determinism():
    g = torch.Generator().manual_seed(0)
    vis = frame_visibility(4000, 4, p_mask=0.3, generator=g)
    hidden = 1 - vis[:, 3, :3].float().mean().item()  # frame 3 may read frames 0..2 unless masked
    assert abs(hidden - 0.3) < 0.02, hidden
    a = frame_visibility(2, 4, p_mask=0.5, generator=torch.Generator().manual_seed(1))
    b = frame_visibility(2, 4, p_mask=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_rope_positions_follow_the_formula():
    pos = LAYOUT.positions()
    P = 2
    assert pos[:2].tolist() == [[0, 0, 0], [1, 1, 1]]
    # frame 1, scale 1 (2x2): tokens (t+P, r+P, c+P) in row-major order
    b = LAYOUT.blocks[3]
    assert pos[b.start:b.end].tolist() == [[1 + P, r + P, c + P] for r in range(2) for c in range(2)]
    assert pos[LAYOUT.blocks[4].start].tolist() == [2 + P, P, P]  # frame 2 scale 0
    stretched = LAYOUT.positions(rope_stretch=True)
    assert stretched[LAYOUT.blocks[0].start].tolist() == [P, P, P]
    small = SequenceLayout(0, 1, ((2, 2), (4, 4)))
    assert small.positions(rope_stretch=True)[:4].tolist() == [[0, r, c] for r in (0, 2) for c in (0, 2)]


def test_rope_grid_gives_one_unit_at_every_stage_resolution():
    """`videoar.rope_grid`: a low-res stage (4x4 grid) and the full stage (8x8) measure positions in the same cells of
    the picture, so the same displacement of the picture is the same RoPE offset in both; non-square grids keep
    square cells (columns scale by W/H)."""
    low, full = SequenceLayout(0, 1, ((2, 2), (4, 4))), SequenceLayout(0, 1, ((2, 2), (4, 4), (8, 8)))
    lo, fu = low.positions(True, rope_grid=8), full.positions(True, rope_grid=8)
    assert lo[:4].equal(fu[:4])  # the 2x2 scale: rows/cols 0, 4 in both
    assert lo[4:].tolist() == [[0, 2 * r, 2 * c] for r in range(4) for c in range(4)]  # a 4x4 cell is 2 units
    assert fu[4:20].equal(lo[4:]) and full.positions(True)[4:20].equal(fu[4:20])  # the full stage: as plain stretch
    wide = SequenceLayout(0, 1, ((1, 2), (2, 4))).positions(True, rope_grid=4)
    assert wide[:2].tolist() == [[0, 0, 0], [0, 0, 4]] and wide[2:].tolist() == [
        [0, 2 * r, 2 * c] for r in range(2) for c in range(4)]
    with pytest.raises(ValueError, match="rope_grid"):
        VideoARConfig(rope_grid=8)  # without rope_stretch


def test_rope_axis_split_and_relative_property():
    assert axis_pairs(64) == (12, 10, 10) and axis_pairs(12) == (2, 2, 2) and sum(axis_pairs(10)) == 5
    head_dim = 12
    pos = torch.tensor([[3.0, 5.0, 7.0], [4.0, 1.0, 2.0]])
    ang = rope_angles(pos, head_dim)
    # pair j of the t axis (2 pairs): angle = t * 10000^(-j/2)
    assert math.isclose(ang[0, 1].item(), 3.0 * 10000 ** (-0.5), rel_tol=1e-9)
    assert math.isclose(ang[0, 2].item(), 5.0, rel_tol=1e-9)  # first h pair has frequency 1
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    shift = torch.tensor([[2.0, -1.0, 4.0]])
    def score(pq, pk):
        return (apply_rope(q[None], rope_angles(pq, head_dim)) * apply_rope(k[None], rope_angles(pk, head_dim))).sum()
    # rotary scores depend only on the position difference, on every axis
    assert torch.allclose(score(pos[:1], pos[1:]), score(pos[:1] + shift, pos[1:] + shift))
    assert torch.allclose(apply_rope(q[None], rope_angles(pos[:1], head_dim)).norm(), q.norm())


def test_flat_rope_is_standard_1d_rope_over_the_sequence():
    """videoar.rope=flat: token i of the sequence (prefix included) at position i, every pair on that one axis
    with frequency base^(-j/n), n = head_dim/2; checked against a rotation written out by hand."""
    pos = LAYOUT.positions(rope="flat")
    assert pos.shape == (17, 1) and pos[:, 0].tolist() == list(range(17))
    assert LAYOUT.positions(rope_stretch=True, rope="flat").equal(pos)  # stretch only concerns the temporal axes
    assert axis_pairs(12, axes=1) == (6,)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # head_dim 4: pair 0 freq 1, pair 1 freq 1/100
    got = apply_rope(x[None], rope_angles(pos[5:6], 4))[0]
    a0, a1 = 5.0, 5.0 / 100
    hand = [1 * math.cos(a0) - 2 * math.sin(a0), 1 * math.sin(a0) + 2 * math.cos(a0),
            3 * math.cos(a1) - 4 * math.sin(a1), 3 * math.sin(a1) + 4 * math.cos(a1)]
    assert torch.allclose(got, torch.tensor(hand, dtype=torch.float64), rtol=0, atol=1e-12)
    ang = rope_angles(pos, 12)
    assert torch.allclose(ang, pos.double() * 10000 ** (-torch.arange(6, dtype=torch.float64) / 6))
    with pytest.raises(ValueError, match=r"videoar\.rope: 'spiral' is not one of \['temporal', 'flat'\]"):
        LAYOUT.positions(rope="spiral")
