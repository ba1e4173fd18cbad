"""The VideoAR transformer: inputs per DESIGN §3.2, KV-cached == full-sequence logits, forward counts, sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.attention_mask import block_causal_mask, frame_visibility
from models.quantizer import MultiScaleBitwiseQuantizer, QuantizerConfig
from models.sampler import SamplingConfig, guidance_gamma, sample, sample_bits
from models.sequence_inputs import sequence_targets, split_frames_scales, teacher_forcing_features
from models.videoar import VideoAR, VideoARConfig

D = 8


def tiny_model(cond="class", **kw) -> VideoAR:
    cfg = VideoARConfig(preset="custom", depth=2, width=32, heads=2, cond=cond, num_classes=3, text_len=4,
                        text_dim=12, **kw)
    model = VideoAR(cfg, D)
    for p in model.parameters():  # the zero-initialised head would make every logit 0
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def random_bits(q: MultiScaleBitwiseQuantizer, b: int, t: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, t, D, h, w, generator=g) > 0.5 for h, w in q.sizes]


def test_features_follow_the_input_definition():
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 4]))
    bits = random_bits(q, 2, 3)
    feats = split_frames_scales(teacher_forcing_features(q, bits), 3, q.sizes)
    for t in range(3):
        frame_bits = [x[:, t] for x in bits]
        prev = q.decode([x[:, t - 1] for x in bits]) if t > 0 else None
        first = torch.zeros_like(feats[0][:, t]) if t == 0 else q.next_input(prev, 0)
        torch.testing.assert_close(feats[0][:, t], first, rtol=0, atol=1e-6)
        for k in range(1, 3):
            expected = q.next_input(q.decode(frame_bits, num_scales=k), k)
            torch.testing.assert_close(feats[k][:, t], expected, rtol=0, atol=1e-6)


def test_prev_frame_features_append_the_previous_frame_at_each_scale():
    """videoar.prev_frame_input: each input is followed by the previous frame's full reconstruction resized to
    the block (zeros on frame 0); the first half is exactly the plain features."""
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 4]))
    bits = random_bits(q, 2, 3)
    plain, both = teacher_forcing_features(q, bits), teacher_forcing_features(q, bits, prev_frame=True)
    assert both.shape == (*plain.shape[:2], 2 * D) and torch.equal(both[..., :D], plain)
    prev = split_frames_scales(both[..., D:].contiguous(), 3, q.sizes)
    for t in range(3):
        for k in range(3):
            expected = torch.zeros_like(prev[k][:, t]) if t == 0 else \
                q.next_input(q.decode([x[:, t - 1] for x in bits]), k)
            torch.testing.assert_close(prev[k][:, t], expected, rtol=0, atol=1e-6)


def test_targets_round_trip():
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 4]))
    bits = random_bits(q, 2, 3)
    back = split_frames_scales(sequence_targets(bits), 3, q.sizes)
    assert all(torch.equal(a, b) for a, b in zip(bits, back))


@pytest.mark.parametrize("cond, rope", [("class", "temporal"), ("text", "temporal"), ("text", "flat")])
def test_kv_cached_logits_equal_full_sequence_logits(cond, rope):
    """Tolerance: 1e-5 absolute on logits of O(1) (fp32; only summation order differs)."""
    model = tiny_model(cond, rope=rope)
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 3, 4]))
    bits = random_bits(q, 2, 3)
    feats = teacher_forcing_features(q, bits)
    c = torch.tensor([0, 2]) if cond == "class" else padded_text(torch.randn(2, 4, 12))
    layout = model.layout_for(3, q.sizes)
    full = model(c, feats, layout)
    cache, P, parts = model.new_cache(2, layout), layout.prefix_len, []
    for block in layout.blocks:
        parts.append(model.forward_block(block, feats[:, block.start - P:block.end - P], layout, cache, cond=c))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cond, window", [("class", 1), ("text", 2)])
def test_windowed_kv_cache_equals_the_window_mask_and_stays_bounded(cond, window):
    """A frame window w at sampling (the Random Frame Mask's window): the KV cache evicts frames that left the window,
    and its logits equal the full forward under the training mask with that window (1e-5, fp32). Its buffers hold
    the prefix + (w + 1) frames whatever the length: 6 frames cost what w + 1 do."""
    model = tiny_model(cond)
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 3]))
    frames = 6
    feats = teacher_forcing_features(q, random_bits(q, 2, frames))
    c = torch.tensor([0, 2]) if cond == "class" else padded_text(torch.randn(2, 4, 12))
    layout = model.layout_for(frames, q.sizes)
    windowed = block_causal_mask(layout, frame_visibility(2, frames, window=window))
    full = model(c, feats, layout, frame_visibility(2, frames, window=window))
    torch.testing.assert_close(full, model(c, feats, layout, mask=windowed), rtol=0, atol=1e-6)
    assert (full - model(c, feats, layout)).abs().max() > 1e-3  # the window changes what frames see
    cache, P, parts = model.new_cache(2, layout, window=window), layout.prefix_len, []
    for block in layout.blocks:
        parts.append(model.forward_block(block, feats[:, block.start - P:block.end - P], layout, cache, cond=c))
        assert cache.stored <= P + (window + 1) * layout.tokens_per_frame
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    assert cache.capacity == P + (window + 1) * layout.tokens_per_frame and cache.length == layout.length
    short = model.new_cache(2, model.layout_for(window + 1, q.sizes), window=window)
    assert cache.nbytes() == short.nbytes() < model.new_cache(2, layout).nbytes()


def padded_text(states: torch.Tensor) -> torch.Tensor:
    """Text states as the text encoder gives them: zero at padding (sample 0: 2 real tokens, sample 1: 3)."""
    states = states.clone()
    states[0, 2:] = 0
    states[1, 3:] = 0
    return states


def test_text_padding_is_masked_out_of_attention():
    """Changing what the padding positions of the prefix hold changes no logit: in the full forward, in the
    KV-cached blocks and through the pipeline-stage pieces; changing a real text token does change them."""
    model = tiny_model("text")
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 3]))
    feats = teacher_forcing_features(q, random_bits(q, 2, 2))
    layout = model.layout_for(2, q.sizes)
    c = padded_text(torch.randn(2, 4, 12))
    base = model(c, feats, layout)
    noise = torch.randn(2, 4, 32)
    pad = (c == 0).all(-1)

    def perturb_padding(module, args, out):  # the projected prefix states at padding positions
        return torch.where(pad[..., None], out + 10 * noise, out)

    handle = model.cond_proj.register_forward_hook(perturb_padding)
    try:
        torch.testing.assert_close(model(c, feats, layout), base, rtol=0, atol=1e-6)
        cache, P, parts = model.new_cache(2, layout), layout.prefix_len, []
        for block in layout.blocks:
            parts.append(model.forward_block(block, feats[:, block.start - P:block.end - P], layout, cache, cond=c))
        torch.testing.assert_close(torch.cat(parts, dim=1), base, rtol=0, atol=1e-5)
        drop = torch.zeros(2)
        vis = frame_visibility(2, layout.num_frames).float()
        x, *side = model.stage_input(layout, feats, c, drop, vis)
        staged = model.stage_output(layout, model.stage_blocks(layout, model.blocks, x, *side))
        torch.testing.assert_close(staged, base, rtol=0, atol=1e-5)
    finally:
        handle.remove()
    c2 = c.clone()
    c2[0, 1] += 1.0  # a real token
    assert (model(c2, feats, layout)[0] - base[0]).abs().max() > 1e-3


def test_flat_rope_changes_the_model_output():
    """videoar.rope=flat on the same weights and layout gives other logits (and its own cached angles)."""
    temporal = tiny_model("text")
    flat = VideoAR(dataclasses.replace(temporal.cfg, rope="flat"), D).eval()
    flat.load_state_dict(temporal.state_dict())
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 4]))
    feats, c = teacher_forcing_features(q, random_bits(q, 2, 3, seed=2)), torch.randn(2, 4, 12)
    layout = temporal.layout_for(3, q.sizes)
    out_t, out_f = temporal(c, feats, layout), flat(c, feats, layout)
    assert flat.tensors(layout).angles[:, 0].tolist() == list(range(layout.length))  # pair 0 of the flat axis
    assert not torch.equal(temporal.tensors(layout).angles, flat.tensors(layout).angles)
    assert (out_t - out_f).abs().max() > 1e-3


@pytest.mark.parametrize("rope, prev_frame", [("temporal", False), ("flat", False), ("temporal", True)])
def test_sampler_inputs_mirror_teacher_forcing(rope, prev_frame):
    """Sampling with every frame given feeds the model exactly the teacher-forcing features: the logits of each
    block equal the full forward's (also with the previous frame in every input)."""
    model = tiny_model(rope=rope, prev_frame_input=prev_frame)
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 4]))
    bits = random_bits(q, 2, 3, seed=1)
    c = torch.tensor([1, 0])
    layout = model.layout_for(3, q.sizes)
    full = model(c, teacher_forcing_features(q, bits, layout.prev_frame), layout)
    seen = []
    hook = model.head.register_forward_hook(lambda m, i, o: seen.append(o))
    res = sample(model, q, c, 3, SamplingConfig(cfg_scale=1.0, temperature=0), given=bits)
    hook.remove()
    torch.testing.assert_close(torch.cat(seen, dim=1).view_as(full), full, rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(res.bits, bits))
    torch.testing.assert_close(res.latent[:, -1], q.decode([x[:, -1] for x in bits]))


def test_sampler_honours_the_frame_window():
    """Sampling with every frame given and a window feeds each block's logits from the windowed forward (the
    training mask with that window); a window as long as the video changes nothing; the cache of a windowed
    6-frame sample is the size of a 2-frame one."""
    model = tiny_model()
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 4]))
    bits, c = random_bits(q, 2, 6, seed=2), torch.tensor([1, 0])
    layout = model.layout_for(6, q.sizes)
    full = model(c, teacher_forcing_features(q, bits), layout, mask=block_causal_mask(layout, frame_visibility(2, 6, 1)))
    seen = []
    hook = model.head.register_forward_hook(lambda m, i, o: seen.append(o))
    res = sample(model, q, c, 6, SamplingConfig(cfg_scale=1.0, temperature=0), given=bits, window=1)
    hook.remove()
    torch.testing.assert_close(torch.cat(seen, dim=1).view_as(full), full, rtol=0, atol=1e-5)
    greedy = SamplingConfig(cfg_scale=1.0, temperature=0)
    unbounded, long_window = sample(model, q, c, 4, greedy), sample(model, q, c, 4, greedy, window=3)
    assert all(torch.equal(a, b) for a, b in zip(unbounded.bits, long_window.bits))
    assert res.cache_bytes == sample(model, q, c, 2, greedy, window=1).cache_bytes < unbounded.cache_bytes


def test_paper_layout_decodes_in_30_forwards():
    model = tiny_model()
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 3, 4, 6, 8]))
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))
    res = sample(model, q, torch.tensor([0]), 5, SamplingConfig(cfg_scale=3.0), generator=torch.Generator())
    hook.remove()
    assert res.forwards == len(calls) == 30
    assert sum(calls) == 1 + 5 * 130  # class prefix + 650 video tokens, each processed once
    assert [x.shape for x in res.bits] == [(1, 5, D, s, s) for s in (1, 2, 3, 4, 6, 8)]


def test_image_to_video_keeps_the_given_frame_and_samples_the_rest():
    model = tiny_model()
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2, 4]))
    given = [x[:, :1] for x in random_bits(q, 2, 1, seed=3)]
    res = sample(model, q, torch.tensor([0, 1]), 3, SamplingConfig(), given=given,
                 generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(r[:, :1], g) for r, g in zip(res.bits, given))
    assert res.forwards == 9
    again = sample(model, q, torch.tensor([0, 1]), 3, SamplingConfig(), given=given,
                   generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(res.bits, again.bits))  # seeded: reproducible


def test_cfg_schedules_match_the_design():
    assert guidance_gamma("constant", 2.5, 3, 1, 5, 6) == 2.5
    # UCF: first scale 1 -> 5 over frames, then linear to 10 at the last scale
    assert [guidance_gamma("ucf", 0, t, 0, 5, 6) for t in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert guidance_gamma("ucf", 0, 0, 5, 5, 6) == 10.0 and guidance_gamma("ucf", 0, 4, 5, 5, 6) == 10.0
    assert guidance_gamma("ucf", 0, 2, 1, 5, 6) == pytest.approx(3.0 + 7.0 / 5)
    # text: 5 -> 3 across frames and scales
    assert guidance_gamma("text", 0, 0, 0, 5, 6) == 5.0 and guidance_gamma("text", 0, 4, 5, 5, 6) == 3.0
    assert guidance_gamma("text", 0, 2, 3, 5, 6) == pytest.approx(5.0 - 2.0 * 15 / 29)


def test_guidance_combines_cond_and_uncond_logits():
    """gamma = 0 samples the unconditional model, gamma = 1 the conditional one (greedy, so exact)."""
    model = tiny_model()
    q = MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=[1, 2]))
    c = torch.tensor([2])
    cond_only = sample(model, q, c, 2, SamplingConfig(cfg_scale=1.0, temperature=0))
    # guided with gamma exactly 1 through the two-pass path: equal to the conditional model
    model_two_pass = sample(model, q, c, 2, SamplingConfig(cfg_schedule="constant", cfg_scale=1.0 + 1e-12,
                                                           temperature=0))
    assert all(torch.equal(a, b) for a, b in zip(cond_only.bits, model_two_pass.bits))
    uncond = sample(model, q, c, 2, SamplingConfig(cfg_scale=0.0, temperature=0))
    layout = model.layout_for(2, q.sizes)
    feats = teacher_forcing_features(q, uncond.bits)
    logits = model(c, feats, layout, drop=torch.tensor([True]))
    assert torch.equal(sequence_targets(uncond.bits), logits[..., 1] > logits[..., 0])


def test_top_p_per_bit():
    logits = torch.tensor([[0.0, 3.0], [0.0, -3.0], [0.0, 0.2]])  # p1 = 0.95, 0.047, 0.55
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_bits(logits, 1.0, 0.9, g) for _ in range(4000)]).float().mean(0)
    assert draws[0] == 1.0 and draws[1] == 0.0  # confident bits are deterministic under top_p 0.9
    assert abs(draws[2].item() - torch.sigmoid(torch.tensor(0.2)).item()) < 0.03  # unsure bit sampled
    full = torch.stack([sample_bits(logits, 1.0, 1.0, g) for _ in range(4000)]).float().mean(0)
    assert abs(full[0].item() - 0.9526) < 0.02
    assert torch.equal(sample_bits(logits, 0.0, 1.0), torch.tensor([True, False, True]))
