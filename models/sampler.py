"""KV-cached sampling (DESIGN §3.7): one forward per (frame, scale) block, classifier-free guidance on logits
with a schedule over (frame, scale), temperature and top-p per bit, and continuation from given frames
(image-to-video: the first latent frame is given).

Inputs are built incrementally with the same quantizer functions as `models.sequence_inputs` uses for training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.quantizer import MultiScaleBitwiseQuantizer
from models.sequence_inputs import block_input, tokens_to_grid
from models.videoar import VideoAR
from common.model_config import CFG_SCHEDULES, SamplingConfig


def guidance_gamma(schedule: str, scale: float, t: int, k: int, num_frames: int, num_scales: int) -> float:
    """Guidance strength for block (frame t, scale k) of num_frames x num_scales (DESIGN §3.7)."""
    ft = t / max(1, num_frames - 1)
    fk = k / max(1, num_scales - 1)
    if schedule == "constant":
        return scale
    if schedule == "ucf":  # first scale of each frame rises 1 -> 5 across frames, then linear to 10 at the last scale
        first = 1.0 + 4.0 * ft
        return first + (10.0 - first) * fk
    if schedule == "text":  # 5 -> 3 across frames and scales (over the block index)
        i, n = t * num_scales + k, num_frames * num_scales
        return 5.0 - 2.0 * i / max(1, n - 1)
    raise ValueError(f"unknown guidance schedule (sample.cfg_schedule) {schedule!r}; choose from {CFG_SCHEDULES}")


def sample_bits(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Bits from logits (..., 2). Greedy at temperature 0. Top-p over a bit's two values: the likelier value alone
    when its probability >= top_p, else both (sampled)."""
    if temperature == 0:
        return logits[..., 1] > logits[..., 0]
    p1 = torch.softmax(logits.float() / temperature, dim=-1)[..., 1]
    # drawn on the generator's device (a seeded CPU generator gives the same bits on any device), then moved
    u = torch.rand(p1.shape, generator=generator, device=generator.device if generator is not None else p1.device)
    draw = u.to(p1.device) < p1
    greedy = p1 > 0.5
    confident = torch.maximum(p1, 1 - p1) >= top_p
    return torch.where(confident, greedy, draw)


@dataclass
class SampleResult:
    bits: list[torch.Tensor]  # per scale (B, T, d, h_k, w_k)
    latent: torch.Tensor  # (B, T, d, h, w) accumulated reconstruction of every frame
    forwards: int  # transformer forward calls made
    cache_bytes: int  # size of the KV cache's buffers (bounded by the window when one is given)


@torch.no_grad()
def sample(model: VideoAR, quantizer: MultiScaleBitwiseQuantizer, cond: torch.Tensor, num_frames: int,
           sampling: SamplingConfig, given: list[torch.Tensor] | None = None,
           generator: torch.Generator | None = None, window: int = 0) -> SampleResult:
    """Sample `num_frames` latent frames for each condition in `cond` (text states or class ids).

    `given`: per-scale bits [(B, T0, d, h_k, w_k)] of the first T0 latent frames (image-to-video when T0 = 1,
    continuation otherwise); their blocks still run (to fill the KV cache) but keep the given bits.
    `window` > 0: each frame sees only the last `window` frames, as a model trained with that frame window did
    (curriculum `window`); the KV cache then holds only those, so memory does not grow with `num_frames`.
    """
    sizes, K, d = quantizer.sizes, quantizer.num_scales, quantizer.dim
    layout = model.layout_for(num_frames, sizes)
    b = cond.shape[0]
    given_frames = 0 if given is None else given[0].shape[1]
    if given is not None and (len(given) != K or given_frames > num_frames or given[0].shape[0] != b):
        raise ValueError(f"given bits must be {K} scales of (B={b}, T0<={num_frames}, {d}, h, w)")
    guided = sampling.guided()
    batch_cond, drop = cond, None
    if guided:  # cond and uncond in one batch
        batch_cond = torch.cat([cond, cond])
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(cond.device)
    cache = model.new_cache(batch_cond.shape[0], layout, window)
    dtype, device = quantizer.dtype, quantizer.device
    out_bits = [torch.zeros(b, num_frames, d, h, w, dtype=torch.bool, device=device) for h, w in sizes]
    latent = torch.zeros(b, num_frames, d, *sizes[-1], dtype=dtype, device=device)
    prev, forwards = None, 0
    for t in range(num_frames):
        acc = torch.zeros(b, d, *sizes[-1], dtype=dtype, device=device)
        for k in range(K):
            block = layout.blocks[t * K + k]
            feats = block_input(quantizer, k, acc, prev, layout.prev_frame)
            if guided:
                feats = torch.cat([feats, feats])
            logits = model.forward_block(block, feats, layout, cache, cond=batch_cond, drop=drop).float()
            forwards += 1
            if t < given_frames:
                bits = given[k][:, t]
            else:
                if guided:
                    gamma = guidance_gamma(sampling.cfg_schedule, sampling.cfg_scale, t, k, num_frames, K)
                    lc, lu = logits[:b], logits[b:]
                    logits = lu + gamma * (lc - lu)
                bits = tokens_to_grid(sample_bits(logits, sampling.temperature, sampling.top_p, generator),
                                      block.height, block.width)
            out_bits[k][:, t] = bits
            acc = quantizer.add_scale(acc, bits, k)
        latent[:, t] = acc
        prev = acc
    return SampleResult(out_bits, latent, forwards, cache.nbytes())
