"""Explicit per-GEMM FLOP count of the VideoAR transformer (Megatron style), for MFU on dashboards (DESIGN §6).

Every GEMM counts 2*m*n*k. Attention is counted two ways: `dense` (L x L), what `scaled_dot_product_attention`
with a boolean block-causal mask computes today (masked entries included; checked against `FlopCounterMode` in
tests/test_flops.py), and `useful`, over the (query, key) pairs the block-causal mask lets through
(`visible_pairs`, about half of L x L): the MFU numerator, so that MFU does not read high once a block-sparse
kernel skips the hidden blocks (torchtitan's MFU > 100% came from counting those). The trainer logs both
(`model_flops` useful, `model_flops_dense`). Element-wise work (norms, RoPE, softmax, SiLU, biases, embeddings)
is not counted. The Random Frame Mask's random drops are not subtracted (a structural count).
"""

from __future__ import annotations

import torch

from models.layout import SequenceLayout
from models.videoar import VideoARConfig
from trainer.step_metrics import clock


def visible_pairs(layout: SequenceLayout, window: int = 0) -> int:
    """(query, key) pairs the block-causal mask allows (models/attention_mask.py): the prefix sees the prefix; a
    token of (frame t, scale k) sees the prefix, frame t's scales <= k and the history frames (the last `window`
    ones when window > 0). Computed from the layout, never from an L x L mask."""
    P, per_frame = layout.prefix_len, layout.tokens_per_frame
    total, seen_in_frame = P * P, []
    cum = 0
    for h, w in layout.sizes:
        cum += h * w
        seen_in_frame.append((h * w, cum))
    for t in range(layout.num_frames):
        history = min(t, window) if window > 0 else t
        total += sum(n * (P + cum_k + history * per_frame) for n, cum_k in seen_in_frame)
    return total


def videoar_gemm_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1,
                       attention: str = "dense", window: int = 0) -> dict[str, int]:
    """Forward FLOPs per named GEMM, summed over layers, for `batch` sequences of `layout`.

    L = layout.length (condition prefix included) runs through the transformer blocks; only the
    L - prefix_len video tokens go through `input_proj` and the head. The class condition is an embedding
    lookup (0 FLOPs); the text condition is a (prefix x text_dim) @ (text_dim x width) projection.
    `attention`: "dense" (L x L score and value products) or "useful" (the mask's visible pairs, `window`).
    """
    if attention not in ("dense", "useful"):
        raise ValueError(f"attention must be dense or useful, got {attention!r}")
    L, w, hidden, depth = layout.length, cfg.width, cfg.mlp_hidden, cfg.depth
    video = layout.length - layout.prefix_len

    def gemm(m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    pairs = L * L if attention == "dense" else visible_pairs(layout, window)
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
    flops["input_proj"] = gemm(video, w, latent_dim)
    flops["cond_proj"] = gemm(layout.prefix_len, w, cfg.text_dim) if cfg.cond == "text" else 0
    flops["head"] = gemm(video, 2 * latent_dim, w)
    return {name: batch * f for name, f in flops.items()}


def forward_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1,
                  attention: str = "dense", window: int = 0) -> int:
    return sum(videoar_gemm_flops(cfg, latent_dim, layout, batch, attention, window).values())


def train_step_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1,
                     attention: str = "dense", window: int = 0) -> int:
    """Forward + backward = 3 x forward (backward: one GEMM for the input gradient and one for the weight
    gradient per forward GEMM). Slightly over the real count: the input features and text states need no
    gradient, so the input-gradient GEMMs of `input_proj` and `cond_proj` never run (tests/test_flops.py)."""
    return 3 * forward_flops(cfg, latent_dim, layout, batch, attention, window)


# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s per GPU, no sparsity), matched by substring
# of torch.cuda.get_device_name(); the MFU denominator on GPUs when run.peak_flops is not given
DATASHEET_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
                        ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
                        ("A6000", 155e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("V100", 125e12))


def datasheet_peak_flops(device_name: str) -> float | None:
    """The datasheet dense bf16 peak of a GPU by name, or None for a GPU not in the table."""
    for key, flops in DATASHEET_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def measure_peak_flops(device: str | torch.device = "cpu", n: int = 2048, repeats: int = 3) -> float:
    """The MFU denominator when `run.peak_flops` is not given. A GPU: its datasheet bf16 peak, else a measured
    bf16 8192^3 GEMM. The CPU: a dense fp32 n^3 GEMM (best of `repeats`): on a shared CPU it is what the process
    can get, not a datasheet."""
    device = torch.device(device)
    dtype = torch.float32
    if device.type == "cuda":
        peak = datasheet_peak_flops(torch.cuda.get_device_name(device))
        if peak is not None:
            return peak
        n, dtype = max(n, 8192), torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        t0 = clock(device)
        (a @ b).sum().item()
        if i:  # the first product warms up
            best = min(best, clock(device) - t0)
    return 2 * n**3 / best
