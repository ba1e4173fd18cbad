"""Block-sparse flex attention (issue 17) against the dense-mask SDPA reference: the same pairs, values and
gradients (fp32, CPU, 1e-5) on the demo and UCF layouts, with and without the Random Frame Mask, a frame window
and text padding; the model with videoar.attention=flex equals it with sdpa, forward, parameter gradients and
through the pipeline-stage pieces."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from common.model_config import VideoARConfig
from models.attention_mask import block_causal_mask, frame_visibility
from models.block_sparse import TILE, attend, block_mask, visible_fraction
from models.layout import SequenceLayout

SCALES = ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8))
LAYOUTS = {
    "demo": SequenceLayout(16, 3, SCALES),  # text prefix, 3 latent frames: 406 tokens
    "ucf": SequenceLayout(1, 5, SCALES),  # class token, 5 latent frames: 651 tokens
}
CASES = [("demo", 0, 0.0, True), ("demo", 0, 0.5, True), ("ucf", 0, 0.0, False), ("ucf", 2, 0.0, False),
         ("ucf", 2, 0.4, True)]


def _tables(name: str, window: int, p_mask: float, padded: bool, batch: int = 2):
    layout = LAYOUTS[name]
    g = torch.Generator().manual_seed(3)
    vis = frame_visibility(batch, layout.num_frames, window, p_mask, g) if window or p_mask else None
    keep = None
    if padded:
        keep = torch.ones(batch, layout.length, dtype=torch.bool)
        keep[0, 3:layout.prefix_len] = False  # sample 0: 3 real text tokens
    dense = block_causal_mask(layout) if vis is None else block_causal_mask(layout, vis)
    dense = dense.expand(batch, -1, -1) if dense.dim() == 2 else dense
    if keep is not None:
        dense = dense & keep[:, None, :]
    return layout, vis, keep, dense


@pytest.mark.parametrize("name, window, p_mask, padded", CASES)
def test_block_mask_holds_the_dense_rule_pair_by_pair(name, window, p_mask, padded):
    """flex's mask_mod over every (query, key) pair equals the dense boolean mask, and the computed tiles are
    exactly the tiles where the dense mask has any allowed pair (so none is skipped that holds one)."""
    layout, vis, keep, dense = _tables(name, window, p_mask, padded)
    mask = block_mask(layout, 2, vis, keep)
    idx = torch.arange(layout.length)
    for b in range(2):
        rule = mask.tables.allowed(torch.tensor(b), idx[:, None], idx[None, :])
        assert torch.equal(rule, dense[b])
    n = -(-layout.length // TILE)
    padded_dense = F.pad(dense, (0, n * TILE - layout.length, 0, n * TILE - layout.length))
    any_pair = padded_dense.view(2, n, TILE, n, TILE).any(4).any(2)
    assert torch.equal(mask.tiles.expand(2, -1, -1), any_pair)


@pytest.mark.parametrize("name, window, p_mask, padded", CASES)
def test_flex_equals_dense_sdpa_values_and_gradients(name, window, p_mask, padded):
    layout, vis, keep, dense = _tables(name, window, p_mask, padded)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.length, 16, generator=g, requires_grad=True) for _ in range(3))
    weight = torch.randn(2, 2, layout.length, 16, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    mask = block_mask(layout, 2, vis, keep)
    for kernel in ("flex_eager", "tiled"):
        out = attend(q, k, v, mask, kernel)
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=kernel)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=kernel)
        with torch.no_grad():  # the forward-only paths (flex directly; tiled without the autograd function)
            torch.testing.assert_close(attend(q, k, v, mask, kernel), ref, rtol=0, atol=1e-5, msg=kernel)


def test_rows_that_see_no_key_give_zeros_like_flex():
    """Every key padding (what a pipeline stage's shape inference can feed: placeholder key-keep tables) leaves
    tile rows with no visible key: the tiled kernel gives them zeros and zero gradients, as flex does, instead of
    failing (it raised "not enough values to unpack" in a CI run of the pipeline test)."""
    layout = LAYOUTS["demo"]
    keep = torch.zeros(2, layout.length, dtype=torch.bool)
    keep[1] = True  # sample 1 is normal, so the tiles of sample 0 alone are empty
    keep[1, 3:layout.prefix_len] = False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.length, 16, generator=g, requires_grad=True) for _ in range(3))
    dense = block_causal_mask(layout).expand(2, -1, -1) & keep[:, None, :]
    ref = F.scaled_dot_product_attention(q[1:], k[1:], v[1:], attn_mask=dense[1:, None])
    for name, mask in (("sample 0 hidden", block_mask(layout, 2, None, keep)),
                       ("all hidden", block_mask(layout, 2, None, torch.zeros_like(keep)))):
        for kernel in ("flex_eager", "tiled"):
            out = attend(q, k, v, mask, kernel)
            assert torch.equal(out[0], torch.zeros_like(out[0])), (name, kernel)
            if name == "sample 0 hidden":
                torch.testing.assert_close(out[1:], ref, rtol=0, atol=1e-5, msg=kernel)
            dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
            assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))
            with torch.no_grad():
                assert torch.equal(attend(q, k, v, mask, kernel)[0], torch.zeros_like(out[0])), (name, kernel)


def test_compiled_flex_equals_dense_sdpa():
    """The compiled flex kernel (CUDA's default; on CPU when videoar.sparse_kernel=flex) on the demo layout with a
    frame mask and text padding: forward values and (tiled backward) gradients within 1e-5 (one ~20 s compile)."""
    layout, vis, keep, dense = _tables("demo", 0, 0.5, True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, layout.length, 16, generator=g, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    out = attend(q, k, v, block_mask(layout, 2, vis, keep), "flex")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_tiles_skip_what_the_causal_rule_hides():
    """On a long layout (17 latent frames, 2,210 video tokens) flex computes about half the tiles: the hidden
    upper triangle is skipped."""
    layout = SequenceLayout(16, 17, SCALES)
    frac = visible_fraction(block_mask(layout, 1))
    assert 0.45 < frac < 0.62, frac


def test_shape_errors_name_the_table():
    layout = LAYOUTS["demo"]
    with pytest.raises(ValueError, match="visibility"):
        block_mask(layout, 2, torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key keep"):
        block_mask(layout, 2, None, torch.ones(2, 5, dtype=torch.bool))


def _models(cond: str, kernel: str):
    from models.videoar import VideoAR
    cfg = VideoARConfig(preset="custom", depth=2, width=32, heads=2, cond=cond, num_classes=3, text_len=16,
                        text_dim=12)
    dense = VideoAR(cfg, 8)
    for p in dense.parameters():  # the zero-initialised head would make every logit 0
        torch.nn.init.normal_(p, std=0.2)
    flex = VideoAR(dataclasses.replace(cfg, attention="flex", sparse_kernel=kernel), 8)
    flex.load_state_dict(dense.state_dict())
    return dense, flex


@pytest.mark.parametrize("cond, p_mask, kernel", [("text", 0.5, "tiled"), ("class", 0.0, "flex_eager"),
                                                   ("class", 0.0, "tiled")])
def test_model_with_flex_equals_sdpa_logits_and_parameter_gradients(cond, p_mask, kernel):
    dense, flex = _models(cond, kernel)
    layout = dense.layout_for(3, SCALES) if cond == "text" else SequenceLayout(1, 3, SCALES)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, layout.length - layout.prefix_len, 8, generator=g)
    c = torch.randn(2, 16, 12, generator=g) if cond == "text" else torch.tensor([0, 2])
    if cond == "text":
        c[0, 5:] = 0  # padding
    vis = frame_visibility(2, 3, 0, p_mask, g) if p_mask else None
    outs = []
    for model in (dense, flex):
        out = model(c, feats, layout, vis)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for (name, a), (_, b) in zip(dense.named_parameters(), flex.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    x, *side = flex.stage_input(layout, feats, c, torch.zeros(2), frame_visibility(2, 3).float() if vis is None
                                else vis.float())
    staged = flex.stage_output(layout, flex.stage_blocks(layout, flex.blocks, x, *side))
    torch.testing.assert_close(staged, outs[0], rtol=0, atol=1e-5)


FRAME_MASK = ["data.frames=9", "videoar_train.ckpt_every=100",
              "curriculum=[{name: s, until_step: 4, resolution: [32, 32], frames: 9, scales: [1, 2, 4], "
              "global_batch: 4, micro_batch: 2, flip_start: 0.2, flip_end: 0.3, p_mask: 0.4}]"]


def _train(clips_dir, tokenizer_ckpt, run_dir, *extra):
    from tests.conftest import make_cfg
    from trainer.train_videoar import VideoARTrainer
    trainer = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, run_dir, *FRAME_MASK, *extra), progress=False)
    return trainer.train().losses, trainer


def _pp_flex_run(rank, world, clips_dir, tokenizer_ckpt, run_dir, out):
    losses, trainer = _train(clips_dir, tokenizer_ckpt, run_dir, "videoar.attention=flex", "parallel.pp=2")
    torch.save({"losses": losses, "state": trainer.engine.local_model_state()}, f"{out}/rank{rank}.pt")


def test_training_with_flex_equals_sdpa(clips_dir, tokenizer_ckpt, tmp_path):
    """4 steps of the tiny preset with the Random Frame Mask: the block-sparse run's losses and final weights equal
    the dense-mask run's (relative 1e-5)."""
    dense, ref = _train(clips_dir, tokenizer_ckpt, tmp_path / "sdpa")
    sparse, run = _train(clips_dir, tokenizer_ckpt, tmp_path / "flex", "videoar.attention=flex")
    assert len(dense) == 4 and sparse == pytest.approx(dense, rel=1e-5)
    for (name, a), (_, b) in zip(ref.model.state_dict().items(), run.model.state_dict().items()):
        assert ((b - a).norm() / a.norm().clamp_min(1e-12)).item() <= 1e-5, name


@pytest.mark.slow
def test_pipeline_stages_with_flex_equal_one_dense_process(clips_dir, tokenizer_ckpt, tmp_path):
    """pp = 2 with block-sparse attention (each stage builds its mask from the visibility and key tables that
    travel with the activations) equals the single-process dense-mask run: losses and weights, relative 1e-5."""
    from parallel.launch import run_local
    dense, ref = _train(clips_dir, tokenizer_ckpt, tmp_path / "sdpa")
    run_local(2, _pp_flex_run, clips_dir, tokenizer_ckpt, tmp_path / "pp", tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert results[-1]["losses"] == pytest.approx(dense, rel=1e-5)
    merged = {k: v for r in results for k, v in r["state"].items()}
    for name, value in ref.model.state_dict().items():
        assert ((merged[name] - value).norm() / value.norm().clamp_min(1e-12)).item() <= 1e-5, name
