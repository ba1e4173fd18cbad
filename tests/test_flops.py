"""The MFU FLOP formula (trainer/flops.py): a hand count for a tiny config, and the formula against the FLOPs
PyTorch's FlopCounterMode counts while the real model runs.

What FlopCounterMode counts (torch 2.13, CPU): nn.Linear -> aten.mm / aten.addmm at 2*m*n*k (a bias is not
counted). F.scaled_dot_product_attention on CPU dispatches to aten._scaled_dot_product_flash_attention_for_cpu
(with or without our boolean mask), which has no FLOP formula registered, so it counts 0. Forcing the MATH
backend (torch.nn.attention.sdpa_kernel) decomposes attention into two aten.bmm per layer (dense L x L, the
masked entries included), which FlopCounterMode counts. So: with the default backend we compare only the
Linear GEMMs; with the MATH backend we compare the whole formula, attention included, exactly.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.layout import SequenceLayout
from models.videoar import VideoAR, VideoARConfig
from trainer.flops import forward_flops, train_step_flops, videoar_gemm_flops

D = 8
SIZES = ((1, 1), (2, 2))  # 5 tokens per frame; 2 frames -> 10 video tokens


def tiny_cfg(cond: str = "class", **kw) -> VideoARConfig:
    return VideoARConfig(preset="custom", depth=2, width=32, heads=2, cond=cond, num_classes=3, text_len=3,
                         text_dim=12, **kw)


def test_hand_count_tiny_class_config():
    cfg = tiny_cfg()
    assert cfg.mlp_hidden == 88  # 8 * ceil(2 * 4 * 32 / 3 / 8) = 8 * ceil(10.67)
    layout = VideoAR(cfg, D).layout_for(2, SIZES)
    assert (layout.prefix_len, layout.length) == (1, 11)
    # L = 11 tokens, width 32, hidden 88, depth 2; 10 video tokens, latent_dim 8
    expected = {
        "qkv": 2 * (2 * 11 * 96 * 32),  # depth * 2*m*n*k = 67584 per layer
        "attn_scores": 2 * (2 * 11 * 11 * 32),  # 7744 per layer
        "attn_values": 2 * (2 * 11 * 32 * 11),
        "attn_proj": 2 * (2 * 11 * 32 * 32),  # 22528 per layer
        "mlp_gate": 2 * (2 * 11 * 88 * 32),  # 61952 per layer
        "mlp_up": 2 * (2 * 11 * 88 * 32),
        "mlp_down": 2 * (2 * 11 * 32 * 88),
        "input_proj": 2 * 10 * 32 * 8,  # 5120
        "cond_proj": 0,  # class token: an embedding lookup
        "head": 2 * 10 * 16 * 32,  # 10240
    }
    assert videoar_gemm_flops(cfg, D, layout) == expected
    assert forward_flops(cfg, D, layout) == 598_272
    assert forward_flops(cfg, D, layout, batch=3) == 3 * 598_272
    assert train_step_flops(cfg, D, layout, batch=3) == 9 * 598_272


def test_hand_count_text_condition():
    cfg = tiny_cfg("text")
    layout = VideoAR(cfg, D).layout_for(2, SIZES)
    assert (layout.prefix_len, layout.length) == (3, 13)
    flops = videoar_gemm_flops(cfg, D, layout)
    assert flops["cond_proj"] == 2 * 3 * 32 * 12  # 2304
    assert flops["attn_scores"] == 2 * (2 * 13 * 13 * 32)
    assert flops["head"] == 2 * 10 * 16 * 32  # the prefix never reaches the head


def _counted(model: VideoAR, cond: torch.Tensor, layout, batch: int, math_sdpa: bool, backward: bool = False):
    feats = torch.randn(batch, layout.length - layout.prefix_len, model.feature_dim)
    with sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext():
        with FlopCounterMode(display=False) as fwd:
            out = model(cond, feats, layout)
        with FlopCounterMode(display=False) as bwd:
            if backward:
                out.square().sum().backward()
    return fwd.get_flop_counts(), bwd.get_flop_counts()


@pytest.mark.parametrize("cond_kind, prev_frame", [("class", False), ("text", False), ("text", True)])
def test_formula_matches_flop_counter(cond_kind, prev_frame):
    cfg, batch = tiny_cfg(cond_kind, prev_frame_input=prev_frame), 2
    model = VideoAR(cfg, D)
    layout = model.layout_for(2, SIZES)
    cond = torch.tensor([0, 2]) if cond_kind == "class" else torch.randn(batch, 3, 12)
    formula = videoar_gemm_flops(cfg, D, layout, batch)
    ops = lambda counts: {str(op): n for op, n in counts["Global"].items()}  # noqa: E731

    # default CPU backend: SDPA is invisible to the counter, the Linear GEMMs must match one by one
    counts, _ = _counted(model, cond, layout, batch, math_sdpa=False)
    assert set(ops(counts)) == {"aten.mm", "aten.addmm"}
    assert sum(ops(counts).values()) == sum(formula.values()) - formula["attn_scores"] - formula["attn_values"]
    for name, module in [("qkv", "attn.qkv"), ("attn_proj", "attn.proj"), ("mlp_gate", "mlp.gate"),
                         ("mlp_up", "mlp.up"), ("mlp_down", "mlp.down")]:
        per_layer = [sum(counts[f"VideoAR.blocks.{i}.{module}"].values()) for i in range(cfg.depth)]
        assert sum(per_layer) == formula[name], name
    assert sum(counts["VideoAR.input_proj"].values()) == formula["input_proj"]
    assert sum(counts["VideoAR.head"].values()) == formula["head"]
    assert sum(counts.get("VideoAR.cond_proj", {}).values()) == formula["cond_proj"]

    # MATH backend: attention becomes two bmm per layer; the whole forward must equal the formula exactly,
    # and the backward is 2 x forward minus the input-gradient GEMMs of input_proj and cond_proj (the features
    # and the frozen text states need no gradient): train_step_flops' 3 x forward over-counts exactly these
    counts, back = _counted(model, cond, layout, batch, math_sdpa=True, backward=True)
    assert ops(counts)["aten.bmm"] == formula["attn_scores"] + formula["attn_values"]
    assert sum(ops(counts).values()) == forward_flops(cfg, D, layout, batch)
    skipped = formula["input_proj"] + formula["cond_proj"]
    assert sum(ops(back).values()) == 2 * forward_flops(cfg, D, layout, batch) - skipped
    measured_step = sum(ops(counts).values()) + sum(ops(back).values())
    assert measured_step == train_step_flops(cfg, D, layout, batch) - skipped


def test_useful_attention_counts_the_pairs_the_mask_lets_through():
    """Hand count on prefix 2, 2 frames, scales 1x1 and 2x2 (5 tokens a frame, L = 12): the prefix rows see 2
    keys; frame 0's scale-0 token sees 2 + 1, its 4 scale-1 tokens 2 + 5; frame 1 adds frame 0's 5 tokens:
    4 + 3 + 28 + 8 + 48 = 91 of 144. With window 1 and 3 frames the third frame sees one history frame. Both
    equal the boolean mask's count (the mask the dense kernel uses)."""
    from models.attention_mask import block_causal_mask, frame_visibility
    from trainer.flops import visible_pairs

    layout = SequenceLayout(2, 2, ((1, 1), (2, 2)))
    assert visible_pairs(layout) == 2 * 2 + (1 * 3 + 4 * 7) + (1 * 8 + 4 * 12) == 91
    assert visible_pairs(layout) == int(block_causal_mask(layout).sum())
    three = SequenceLayout(2, 3, ((1, 1), (2, 2)))
    windowed = block_causal_mask(three, frame_visibility(1, 3, window=1))[0]
    assert visible_pairs(three, window=1) == int(windowed.sum()) == 91 + (1 * 8 + 4 * 12) < visible_pairs(three)
    cfg = tiny_cfg()  # depth 2, width 32
    dense, useful = (videoar_gemm_flops(cfg, D, layout, attention=a) for a in ("dense", "useful"))
    assert dense["attn_scores"] == 2 * (2 * 144 * 32) and useful["attn_scores"] == 2 * (2 * 91 * 32)
    assert {k: v for k, v in dense.items() if not k.startswith("attn_s") and k != "attn_values"} == \
        {k: v for k, v in useful.items() if not k.startswith("attn_s") and k != "attn_values"}
