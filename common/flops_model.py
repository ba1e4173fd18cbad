"""The FLOP arithmetic of the VideoAR transformer (Megatron style), from plain numbers: the config dataclass and a
sequence's shape (prefix length, latent frames, scale sizes). One formula for the trainer's MFU (trainer/flops.py
wraps it around a `SequenceLayout`) and the capacity planner (parallel/plan.py), neither of which may import the
other's packages.

Every GEMM counts 2*m*n*k. Attention is counted `dense` (L x L, what SDPA with a boolean mask computes) or `useful`
(the (query, key) pairs the block-causal mask lets through, `visible_pairs`). Element-wise work is not counted.
"""

from __future__ import annotations

from common.model_config import VideoARConfig

Sizes = tuple[tuple[int, int], ...]


def sequence_length(prefix_len: int, num_frames: int, sizes: Sizes) -> int:
    """Tokens of one sequence: the condition prefix, then per latent frame its scales."""
    return prefix_len + num_frames * sum(h * w for h, w in sizes)


def visible_pairs(prefix_len: int, num_frames: int, sizes: Sizes, window: int = 0) -> int:
    """(query, key) pairs the block-causal mask allows (models/attention_mask.py): the prefix sees the prefix; a
    token of (frame t, scale k) sees the prefix, frame t's scales <= k and the history frames (the last `window`
    ones when window > 0). Computed from the shape, never from an L x L mask."""
    P, per_frame = prefix_len, sum(h * w for h, w in sizes)
    total, seen_in_frame = P * P, []
    cum = 0
    for h, w in sizes:
        cum += h * w
        seen_in_frame.append((h * w, cum))
    for t in range(num_frames):
        history = min(t, window) if window > 0 else t
        total += sum(n * (P + cum_k + history * per_frame) for n, cum_k in seen_in_frame)
    return total


def gemm_flops(cfg: VideoARConfig, latent_dim: int, prefix_len: int, num_frames: int, sizes: Sizes,
               batch: int = 1, attention: str = "dense", window: int = 0) -> dict[str, int]:
    """Forward FLOPs per named GEMM, summed over layers, for `batch` sequences of this shape.

    L (condition prefix included) runs through the transformer blocks; only the L - prefix_len video tokens go
    through `input_proj` and the head. The class condition is an embedding lookup (0 FLOPs); the text condition
    is a (prefix x text_dim) @ (text_dim x width) projection."""
    if attention not in ("dense", "useful"):
        raise ValueError(f"attention must be dense or useful, got {attention!r}")
    L = sequence_length(prefix_len, num_frames, sizes)
    w, hidden, depth, video = cfg.width, cfg.mlp_hidden, cfg.depth, L - prefix_len

    def gemm(m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    pairs = L * L if attention == "dense" else visible_pairs(prefix_len, num_frames, sizes, window)
    per_layer = {
        "qkv": gemm(L, 3 * w, w),
        "attn_scores": 2 * pairs * w,  # q @ k^T, all heads: heads * (pairs x head_dim)
        "attn_values": 2 * pairs * w,  # softmax @ v
        "attn_proj": gemm(L, w, w),
        "mlp_gate": gemm(L, hidden, w),
        "mlp_up": gemm(L, hidden, w),
        "mlp_down": gemm(L, w, hidden),
    }
    flops = {name: depth * f for name, f in per_layer.items()}
    flops["input_proj"] = gemm(video, w, cfg.feature_dim(latent_dim))
    flops["cond_proj"] = gemm(prefix_len, w, cfg.text_dim) if cfg.cond == "text" else 0
    flops["head"] = gemm(video, 2 * latent_dim, w)
    return {name: batch * f for name, f in flops.items()}


def train_step_flops(cfg: VideoARConfig, latent_dim: int, prefix_len: int, num_frames: int, sizes: Sizes,
                     batch: int = 1, attention: str = "dense", window: int = 0) -> int:
    """Forward + backward = 3 x forward (backward: one GEMM for the input gradient and one for the weight
    gradient per forward GEMM). Slightly over the real count: the input features and text states need no
    gradient, so the input-gradient GEMMs of `input_proj` and `cond_proj` never run (tests/test_flops.py)."""
    return 3 * sum(gemm_flops(cfg, latent_dim, prefix_len, num_frames, sizes, batch, attention, window).values())
