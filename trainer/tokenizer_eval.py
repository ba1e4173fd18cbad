"""Held-out quality of the multi-scale tokenizer (issue 15): PSNR and SSIM of the reconstruction from all scales
and from the first k scales (how much each scale adds), PSNR per frame, and the mean colour error on the objects
a synthetic-world caption names (colour fidelity, which PSNR on a mostly flat background hides).
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.clips import to_uint8_frames
from data_pipeline.synth_detect import color_mask
from models.tokenizer import VideoTokenizer
from common.metrics import psnr
from trainer.video_metrics import caption_scores, mean_scores, parse_caption, psnr_per_frame, ssim_per_frame


def object_color_error(original: np.ndarray, recon: np.ndarray, caption: str) -> float | None:
    """Mean absolute RGB error (0-255) of `recon` on the pixels where `original` (T, H, W, 3 uint8) shows the
    caption's first object; None for a caption outside the synthetic world or an object never visible."""
    objects = parse_caption(caption)
    if not objects:
        return None
    mask = np.stack([color_mask(f, objects[0]["color"]) for f in original])
    if not mask.any():
        return None
    return float(np.abs(original.astype(np.float32) - recon.astype(np.float32))[mask].mean())


@torch.no_grad()
def tokenizer_quality(model: VideoTokenizer, x: torch.Tensor, captions: list[str] | None = None
                      ) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics, reconstruction from all scales) for held-out videos x (B, 3, T, H, W) in [-1, 1], in eval mode
    (the training mode is restored). Keys: psnr, ssim, psnr_scales{k} for k = 1..K, psnr_frame{t},
    color_error and caption_{color,shape,direction,present_90} (when captions name synthetic-world objects: the
    reconstructions scored against their captions like sampled videos, the ceiling this tokenizer sets for them)."""
    was_training = model.training
    model.eval()
    bits = model.encode_bits(x)
    num_scales = model.quantizer.num_scales
    out: dict[str, float] = {}
    recon = None
    for k in range(1, num_scales + 1):
        recon = model.decode_bits(bits, x.shape[0], k)
        out[f"psnr_scales{k}"] = psnr(recon, x)
    model.train(was_training)
    out["psnr"] = out[f"psnr_scales{num_scales}"]
    out["ssim"] = float(ssim_per_frame(x, recon).mean())
    out.update({f"psnr_frame{t}": float(v) for t, v in enumerate(psnr_per_frame(x, recon))})
    if captions:
        orig, rec = to_uint8_frames(x), to_uint8_frames(recon)
        errors = [e for e in (object_color_error(o, r, c) for o, r, c in zip(orig, rec, captions)) if e is not None]
        if errors:
            out["color_error"] = float(np.mean(errors))
        ceiling = mean_scores([caption_scores(r, c) for r, c in zip(rec, captions)])
        out.update({f"caption_{k}": ceiling[k] for k in ("color", "shape", "direction", "present_90") if k in ceiling})
    return out, recon
