"""Block-wise KV-cached sampling vs two baselines on the paper's UCF layout, measured side by side in one run.

    python -m benchmarks.videoar_sampling [--repeats 5] [--threads 2] [--batch 8]

(i)  KV-cached sampling (`models.sampler.sample`, one forward per (frame, scale) block) vs an uncached sampler
     that, for each block, reruns the full forward over the condition prefix and every block so far. Both are
     greedy (temperature 0, cfg_scale 1) and must sample the same bits (checked and printed).
(ii) Block-wise decoding vs next-token AR on the same grid: 30 block forwards vs 650 single-token forwards
     (forward counts), and the time of an honest next-token KV-cached loop of 650 single-token forwards.
(iii) Throughput at --batch prompts per forward: videos/s, forwards/s and achieved FLOP/s (the model FLOPs of
     every token once with attention over its visible keys, `trainer/flops.py`), and the cached/uncached ratio.
Random-init model (depth 4, width 256, heads 4, class condition), scales (1,2,3,4,6,8), 5 latent frames
(650 tokens, 30 blocks), latent_dim 16. Speed is about the number and shape of forwards, not about weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from models.quantizer import MultiScaleBitwiseQuantizer, QuantizerConfig
from models.sampler import SamplingConfig, sample, sample_bits
from models.sequence_inputs import block_input, tokens_to_grid
from models.videoar import VideoAR, VideoARConfig, layout_mask
from trainer.flops import forward_flops

D, FRAMES, SCALES = 16, 5, [1, 2, 3, 4, 6, 8]


def build() -> tuple[VideoAR, MultiScaleBitwiseQuantizer]:
    torch.manual_seed(0)
    cfg = VideoARConfig(preset="custom", depth=4, width=256, heads=4, cond="class", num_classes=10)
    model = VideoAR(cfg, D)
    torch.nn.init.normal_(model.head.weight, std=0.2)  # the zero-initialised head would make every bit 0
    return model.eval(), MultiScaleBitwiseQuantizer(D, QuantizerConfig(scales=SCALES))


def forward_prefix(model: VideoAR, cond: torch.Tensor, features: torch.Tensor, layout, end: int) -> torch.Tensor:
    """`VideoAR.forward` restricted to tokens [0, end): prefix + video features so far, block-causal mask."""
    lt, P, mask = model.tensors(layout), layout.prefix_len, layout_mask(layout)
    x = torch.cat([model.prefix(cond), model.embed_video(features[:, :end - P], lt, 0, end - P)], dim=1)
    for blk in model.blocks:
        x = blk(x, lt.rotation[:end], mask[:end, :end])
    return model.logits(x[:, P:])


@torch.no_grad()
def sample_uncached(model: VideoAR, q: MultiScaleBitwiseQuantizer, cond: torch.Tensor) -> list[torch.Tensor]:
    """Greedy sampling without a KV cache: one full forward over everything so far per block (same inputs and
    bit rule as `models.sampler.sample`)."""
    layout, K, b = model.layout_for(FRAMES, q.sizes), q.num_scales, cond.shape[0]
    features = torch.zeros(b, layout.length - layout.prefix_len, D)
    out = [torch.zeros(b, FRAMES, D, h, w, dtype=torch.bool) for h, w in q.sizes]
    prev = None
    for t in range(FRAMES):
        acc = torch.zeros(b, D, *q.sizes[-1])
        for k in range(K):
            block = layout.blocks[t * K + k]
            lo, hi = block.start - layout.prefix_len, block.end - layout.prefix_len
            features[:, lo:hi] = block_input(q, k, acc, prev)
            logits = forward_prefix(model, cond, features, layout, block.end)[:, lo:hi].float()
            bits = tokens_to_grid(sample_bits(logits, 0.0, 1.0).float(), block.height, block.width) > 0.5
            out[k][:, t] = bits
            acc = q.add_scale(acc, bits, k)
        prev = acc
    return out


@torch.no_grad()
def next_token_loop(model: VideoAR, cond: torch.Tensor, layout) -> int:
    """Next-token AR with a KV cache over the same tokens (same RoPE positions and scale embeddings): one forward
    per video token, the first also runs the prefix; a token's input is the code of the previous token's greedy
    bits. Returns the number of forwards."""
    lt, P, b = model.tensors(layout), layout.prefix_len, cond.shape[0]
    cache = model.new_cache(b, layout)
    feat, forwards = torch.zeros(b, 1, D), 0
    for i in range(layout.length - P):
        x, start, mask = model.embed_video(feat, lt, i, i + 1), P + i, None  # one query sees every cached key
        if i == 0:
            x, start, mask = torch.cat([model.prefix(cond), x], dim=1), 0, torch.ones(P + 1, P + 1).tril().bool()
        for j, blk in enumerate(model.blocks):
            x = blk(x, lt.rotation[start:P + i + 1], mask, cache, j)
        cache.commit(x.shape[1])
        bits = sample_bits(model.logits(x[:, -1:]).float(), 0.0, 1.0)  # (B, 1, D)
        feat, forwards = (bits.float() * 2 - 1) / D**0.5, forwards + 1
    return forwards


def timed(fn, repeats: int) -> tuple[float, object]:
    out, times = fn(), []  # warmup
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=8, help="prompts per forward for the throughput line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    model, q = build()
    cond = torch.tensor([3])
    layout = model.layout_for(FRAMES, q.sizes)
    n_video, n_blocks = layout.length - layout.prefix_len, len(layout.blocks)
    greedy = SamplingConfig(cfg_scale=1.0, temperature=0.0)

    t_cached, res = timed(lambda: sample(model, q, cond, FRAMES, greedy), args.repeats)
    t_uncached, bits_uncached = timed(lambda: sample_uncached(model, q, cond), args.repeats)
    t_token, token_forwards = timed(lambda: next_token_loop(model, cond, layout), args.repeats)
    same = all(torch.equal(a, b) for a, b in zip(res.bits, bits_uncached))
    ones = sum(int(x.sum()) for x in res.bits) / sum(x.numel() for x in res.bits)

    print(f"model: depth 4, width 256, heads 4, class cond, latent_dim {D}; scales {SCALES}, {FRAMES} latent frames "
          f"-> {n_video} video tokens, {n_blocks} blocks; {args.threads} threads, median of {args.repeats}; "
          f"load average before the run {load:.2f}")
    print(f"same bits, KV-cached vs uncached (greedy, cfg 1): {same} (fraction of 1-bits {ones:.3f})")
    print(f"(i)  KV-cached block sampling: {t_cached * 1e3:.1f} ms ({res.forwards} forwards)")
    print(f"     uncached (full forward over everything so far, per block): {t_uncached * 1e3:.1f} ms")
    print(f"     speed-up of the KV cache: {t_uncached / t_cached:.2f}x")
    print(f"(ii) decode forwards: block-wise {res.forwards} vs next-token {token_forwards}: "
          f"{token_forwards / res.forwards:.2f}x fewer")
    print(f"     next-token KV-cached loop ({token_forwards} single-token forwards): {t_token * 1e3:.1f} ms; "
          f"block-wise is {t_token / t_cached:.2f}x faster")
    # (iii) several prompts per forward: the small per-block GEMMs get taller, the weights are read once per batch
    conds = torch.arange(args.batch) % 10
    t_batch, res_b = timed(lambda: sample(model, q, conds, FRAMES, greedy), args.repeats)
    t_batch_uncached, _ = timed(lambda: sample_uncached(model, q, conds), max(1, args.repeats // 2))
    flops = forward_flops(model.cfg, D, layout, args.batch, attention="useful")  # every token once, visible keys
    print(f"(iii) batch {args.batch}: KV-cached {t_batch * 1e3:.1f} ms = {args.batch / t_batch:.2f} videos/s, "
          f"{res_b.forwards / t_batch:.0f} forwards/s, {flops / t_batch / 1e9:.1f} GFLOP/s achieved "
          f"(batch 1: {forward_flops(model.cfg, D, layout, 1, attention='useful') / t_cached / 1e9:.1f} GFLOP/s); "
          f"uncached {t_batch_uncached * 1e3:.1f} ms: {t_batch_uncached / t_batch:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
