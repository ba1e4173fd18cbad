"""The VideoAR training objective for one micro-batch: Cross-Frame Error Correction on the continuous latents,
teacher-forced inputs from the corrupted bits, block-causal (+ Random Frame Mask) attention, per-bit
cross-entropy against the corrected labels (DESIGN §3.2-3.6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.attention_mask import block_causal_mask, frame_visibility
from models.quantizer import MultiScaleBitwiseQuantizer
from models.sequence_inputs import sequence_targets, teacher_forcing_features
from models.videoar import VideoAR
from trainer.curriculum import StageConfig


@dataclass
class MicroBatchResult:
    loss: torch.Tensor  # mean per-bit cross-entropy (scalar, differentiable)
    token_loss: torch.Tensor  # (L_video,) per-token loss summed over the batch (detached)
    token_correct: torch.Tensor  # (L_video,) correct bits summed over the batch and bits (detached)
    flip_ratio: float  # mean drawn flip ratio


def micro_batch_loss(model: VideoAR, quantizer: MultiScaleBitwiseQuantizer, latents: torch.Tensor,
                     cond: torch.Tensor, stage: StageConfig, p_max: float, p_min: float, delta: float,
                     generator: torch.Generator, autocast: bool = False) -> MicroBatchResult:
    """latents (B, T, d, h, w) float. p_max = 0 turns error correction off (plain teacher forcing: p_min and
    delta are ignored then)."""
    b, t = latents.shape[:2]
    if p_max > 0:
        ec = quantizer.encode_with_error_correction(latents, p_max, min(p_min, p_max), delta, generator)
    else:
        ec = quantizer.encode_with_error_correction(latents, 0.0, 0.0, 0.0, generator)
    features = teacher_forcing_features(quantizer, ec.inputs)
    targets = sequence_targets(ec.labels)  # (B, L_video, d)
    layout = model.layout_for(t, quantizer.sizes)
    mask = None
    if stage.p_mask > 0 or stage.window > 0:
        mask = block_causal_mask(layout, frame_visibility(b, t, stage.window, stage.p_mask, generator))
    drop = torch.rand(b, generator=generator) < model.cfg.cond_drop
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(cond, features, layout, mask, drop.to(latents.device))
    logits = logits.float()
    per_bit = F.cross_entropy(logits.reshape(-1, 2), targets.reshape(-1).long(), reduction="none").view(targets.shape)
    correct = ((logits[..., 1] > logits[..., 0]) == targets).float()
    return MicroBatchResult(per_bit.mean(), per_bit.detach().mean(2).sum(0), correct.sum((0, 2)),
                            float(ec.ratios.mean()))


def breakdown(token_loss: torch.Tensor, token_correct: torch.Tensor, samples: int, latent_dim: int,
              frame_ids: torch.Tensor, scale_ids: torch.Tensor) -> dict[str, float]:
    """Per-scale and per-frame losses and the overall bit accuracy from per-token sums."""
    out = {"bit_acc": float(token_correct.sum() / (samples * latent_dim * token_loss.numel()))}
    for name, ids in (("scale", scale_ids), ("frame", frame_ids)):
        for i in range(int(ids.max()) + 1):
            sel = ids == i
            out[f"loss_{name}{i}"] = float(token_loss[sel].sum() / (samples * sel.sum()))
    return out
