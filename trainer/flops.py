"""Explicit per-GEMM FLOP count of the VideoAR transformer (Megatron style), for MFU on dashboards (DESIGN §6).

Every GEMM counts 2*m*n*k. Attention is counted two ways: `dense` (L x L), what `scaled_dot_product_attention`
with a boolean block-causal mask computes today (masked entries included; checked against `FlopCounterMode` in
tests/test_flops.py), and `useful`, over the (query, key) pairs the block-causal mask lets through
(`visible_pairs`, about half of L x L): the MFU numerator, so that MFU does not read high once a block-sparse
kernel skips the hidden blocks (torchtitan's MFU > 100% came from counting those). The trainer logs both
(`model_flops` useful, `model_flops_dense`). Element-wise work (norms, RoPE, softmax, SiLU, biases, embeddings)
is not counted. The Random Frame Mask's random drops are not subtracted (a structural count). The arithmetic
itself is common/flops_model.py's (shared with the capacity planner, parallel/plan.py); this module applies it to
a `SequenceLayout` and measures the CPU's peak.
"""

from __future__ import annotations

import torch

from common import flops_model
from common.gpu_specs import DATASHEET_BF16_FLOPS, datasheet_peak_flops  # noqa: F401 (the MFU denominator's table)
from models.layout import SequenceLayout
from models.videoar import VideoARConfig
from trainer.step_metrics import clock


def _shape(layout: SequenceLayout) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    return layout.prefix_len, layout.num_frames, layout.sizes


def visible_pairs(layout: SequenceLayout, window: int = 0) -> int:
    """(query, key) pairs the block-causal mask allows (models/attention_mask.py), from the layout
    (common/flops_model.py), never from an L x L mask."""
    return flops_model.visible_pairs(*_shape(layout), window)


def videoar_gemm_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1,
                       attention: str = "dense", window: int = 0) -> dict[str, int]:
    """Forward FLOPs per named GEMM, summed over layers, for `batch` sequences of `layout`
    (common/flops_model.gemm_flops). `attention`: "dense" (L x L) or "useful" (the mask's visible pairs)."""
    return flops_model.gemm_flops(cfg, latent_dim, *_shape(layout), batch, attention, window)


def forward_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1,
                  attention: str = "dense", window: int = 0) -> int:
    return sum(videoar_gemm_flops(cfg, latent_dim, layout, batch, attention, window).values())


def train_step_flops(cfg: VideoARConfig, latent_dim: int, layout: SequenceLayout, batch: int = 1,
                     attention: str = "dense", window: int = 0) -> int:
    """Forward + backward = 3 x forward (common/flops_model.train_step_flops)."""
    return flops_model.train_step_flops(cfg, latent_dim, *_shape(layout), batch, attention, window)


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
