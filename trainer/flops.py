"""Explicit per-GEMM FLOP count of the VideoAR transformer (Megatron style), for MFU on dashboards (DESIGN §6).

Every GEMM counts 2*m*n*k. Attention is counted dense (L x L): `scaled_dot_product_attention` with a boolean
block-causal mask computes the full score and value products, masked entries included. Element-wise work
(norms, RoPE, softmax, SiLU, biases, embeddings) is not counted. Checked against `FlopCounterMode` in
tests/test_flops.py.
"""

from __future__ import annotations

from models.layout import SequenceLayout
from models.videoar import VideoARConfig


def videoar_gemm_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1) -> dict[str, int]:
    """Forward FLOPs per named GEMM, summed over layers, for `batch` sequences of `layout`.

    L = layout.length (condition prefix included) runs through the transformer blocks; only the
    L - prefix_len video tokens go through `input_proj` and the head. The class condition is an embedding
    lookup (0 FLOPs); the text condition is a (prefix x text_dim) @ (text_dim x width) projection.
    """
    L, w, hidden, depth = layout.length, cfg.width, cfg.mlp_hidden, cfg.depth
    video = layout.length - layout.prefix_len

    def gemm(m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    per_layer = {
        "qkv": gemm(L, 3 * w, w),
        "attn_scores": gemm(L, L, w),  # q @ k^T, all heads: heads * (L x head_dim x L)
        "attn_values": gemm(L, w, L),  # softmax @ v
        "attn_proj": gemm(L, w, w),
        "mlp_gate": gemm(L, hidden, w),
        "mlp_up": gemm(L, hidden, w),
        "mlp_down": gemm(L, w, hidden),
    }
    flops = {name: depth * f for name, f in per_layer.items()}
    flops["input_proj"] = gemm(video, w, latent_dim)
    flops["cond_proj"] = gemm(layout.prefix_len, w, cfg.text_dim) if cfg.cond == "text" else 0
    flops["head"] = gemm(video, 2 * latent_dim, w)
    return {name: batch * f for name, f in flops.items()}


def forward_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1) -> int:
    return sum(videoar_gemm_flops(cfg, latent_dim, layout, batch).values())


def train_step_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1) -> int:
    """Forward + backward = 3 x forward (backward: one GEMM for the input gradient and one for the weight
    gradient per forward GEMM). Slightly over the real count: the input features and text states need no
    gradient, so the input-gradient GEMMs of `input_proj` and `cond_proj` never run (tests/test_flops.py)."""
    return 3 * forward_flops(cfg, latent_dim, layout, batch)


def measure_peak_flops(device: str = "cpu", n: int = 2048, repeats: int = 3) -> float:
    """This device's dense fp32 GEMM rate (FLOP/s, best of `repeats` n x n x n products): the MFU denominator
    when `run.peak_flops` is not given. On a shared CPU it is what the process can get, not the datasheet."""
    import time

    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        if i:  # the first product warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
