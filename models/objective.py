"""The VideoAR training objective (DESIGN §3.2-3.6): Cross-Frame Error Correction on the continuous latents,
teacher-forced inputs from the corrupted bits, block-causal (+ Random Frame Mask) attention (the model builds the
mask from the frame visibility table), per-bit cross-entropy against the corrected labels.

Every random draw of a sample (flip ratios and flips, frame mask, condition dropout) comes from a generator seeded
by (run seed, step, the sample's position in the global batch), so the objective does not depend on how the
global batch is cut into micro-batches or spread over data-parallel ranks: every parallel layout computes the
same training run as one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from models.attention_mask import frame_visibility
from models.layout import SequenceLayout
from models.quantizer import MultiScaleBitwiseQuantizer
from models.sequence_inputs import sequence_targets, teacher_forcing_features
from common.train_config import SCALE_LOSS_WEIGHTS, StageConfig


@dataclass
class MicroBatch:
    """What an engine (parallel/engine.py) runs: `model(*model_args())`, or `stage_args()` into the first pipeline
    stage; `static` is the token layout."""

    features: torch.Tensor  # (B, L_video, d) teacher-forcing inputs
    targets: torch.Tensor  # (B, L_video, d) bool labels
    cond: torch.Tensor  # text states (B, P, D) or class ids (B,)
    drop: torch.Tensor  # (B,) bool: condition replaced by the null prefix
    visibility: torch.Tensor | None  # (B, T, T) bool frame visibility (Random Frame Mask / window), None = all history
    flip_ratio: torch.Tensor  # (B,) mean drawn flip ratio per sample
    layout: SequenceLayout | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def static(self) -> SequenceLayout:
        return self.layout

    def model_args(self) -> tuple:
        return self.cond, self.features, self.layout, self.visibility, self.drop

    def stage_args(self) -> tuple[torch.Tensor, ...]:
        """Tensors only, batch first (pipeline stages pass tensors): the default visibility made explicit."""
        vis = self.visibility if self.visibility is not None else \
            frame_visibility(len(self), self.layout.num_frames).to(self.features.device)
        return self.features, self.cond, self.drop.float(), vis.float()

    def split(self, size: int) -> list["MicroBatch"]:
        n = len(self)
        return [MicroBatch(*(None if x is None else x[i:i + size] for x in (
            self.features, self.targets, self.cond, self.drop, self.visibility, self.flip_ratio)), layout=self.layout)
            for i in range(0, n, size)]


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The random stream of the sample at `position` of step `step`'s global batch."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 65_537 + position) % (2**63))


@torch.no_grad()
def prepare_batch(quantizer: MultiScaleBitwiseQuantizer, layout: SequenceLayout, latents: torch.Tensor,
                  cond: torch.Tensor, stage: StageConfig, cond_drop: float, p_max: float, p_min: float, delta: float,
                  generators: list[torch.Generator], inherit: bool = True) -> MicroBatch:
    """Inputs and labels for latents (B, T, d, h, w), one generator per sample. p_max = 0 turns error correction
    off (plain teacher forcing; p_min, delta and inherit are ignored then); `inherit` is the flip-ratio inheritance
    across frames (`videoar_train.flip_inherit`)."""
    if p_max <= 0:
        p_max = p_min = delta = 0.0
    inputs, labels, ratios, vis, drop = [], [], [], [], []
    t = latents.shape[1]
    for i, g in enumerate(generators):
        ec = quantizer.encode_with_error_correction(latents[i:i + 1], p_max, min(p_min, p_max), delta, g, inherit)
        inputs.append(ec.inputs)
        labels.append(ec.labels)
        ratios.append(ec.ratios.mean())
        if stage.p_mask > 0 or stage.window > 0:
            vis.append(frame_visibility(1, t, stage.window, stage.p_mask, g))
        drop.append(torch.rand(1, generator=g) < cond_drop)
    # the draws come from CPU generators (per sample, layout-independent); everything returned is on the device
    device = latents.device
    per_scale = lambda xs: [torch.cat([x[k] for x in xs]) for k in range(quantizer.num_scales)]  # noqa: E731
    visibility = torch.cat(vis).to(device) if vis else None
    return MicroBatch(teacher_forcing_features(quantizer, per_scale(inputs), layout.prev_frame),
                      sequence_targets(per_scale(labels)),
                      cond.to(device), torch.cat(drop).to(device), visibility, torch.stack(ratios).float().to(device),
                      layout)


@lru_cache(maxsize=32)  # one per curriculum stage shape; read-only
def scale_loss_weights(layout: SequenceLayout, mode: str, motion_weight: float = 1.0, motion_scales: int = 2,
                       first_weight: float = 1.0) -> torch.Tensor | None:
    """Per video token, the weight of its loss (DESIGN §3.5, optional per-scale reweighting), or None for a plain
    mean. `sqrt_area` is Infinity's `reweight_loss_by_scale`: a token of scale k weighs sqrt(H*W / (h_k*w_k)), so
    the few coarse tokens that set a frame's layout count for more. `motion_weight` (videoar_train.motion_loss_weight)
    multiplies the weight of scales 1..`motion_scales` of every frame after the first: the few tokens where a
    frame's motion is decided (its 1x1 scale is the previous frame's mean; finer scales follow the coarse ones).
    `first_weight` (videoar_train.first_frame_loss_weight) multiplies scales 0..`motion_scales` of the first frame:
    where a text-to-video sample's layout (is the object there, where) is decided with no history. Normalized to
    mean 1, so the loss keeps its scale (ln 2 for an untrained head)."""
    if mode not in SCALE_LOSS_WEIGHTS:
        raise ValueError(f"videoar_train.scale_loss_weight: {mode!r} is not one of {list(SCALE_LOSS_WEIGHTS)}")
    if mode == "none" and motion_weight == 1.0 and first_weight == 1.0:
        return None
    H, W = layout.sizes[-1]
    per_scale = torch.tensor([math.sqrt(H * W / (h * w)) if mode == "sqrt_area" else 1.0 for h, w in layout.sizes],
                             dtype=torch.float64)
    frame_ids, scale_ids = (ids[layout.prefix_len:] for ids in layout.token_ids())
    w = per_scale[scale_ids]
    w[(frame_ids >= 1) & (scale_ids >= 1) & (scale_ids <= motion_scales)] *= motion_weight
    w[(frame_ids == 0) & (scale_ids <= motion_scales)] *= first_weight
    return (w / w.mean()).float()


def bit_loss(logits: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bit cross-entropy averaged over bits and tokens (tokens weighted by `token_weights`, mean 1, when
    given), and per-token sums over the batch (detached, unweighted) of the loss and correct bits."""
    logits = logits.float()
    per_bit = F.cross_entropy(logits.reshape(-1, 2), targets.reshape(-1).long(), reduction="none").view(targets.shape)
    correct = ((logits[..., 1] > logits[..., 0]) == targets).float()
    loss = per_bit.mean() if token_weights is None else (per_bit.mean(2) * token_weights.to(per_bit.device)).mean()
    return loss, per_bit.detach().mean(2).sum(0), correct.sum((0, 2))


@dataclass(frozen=True)
class BitObjective:
    """The engines' objective (parallel/engine.py `Objective`): the bitwise loss of a micro-batch's logits and,
    as statistics, per-token sums of the bit loss and of the correct bits (2 x video tokens)."""

    tokens: int  # video tokens per sample
    token_weights: torch.Tensor | None = None  # `scale_loss_weights`; None = a plain mean

    @property
    def stats_size(self) -> int:
        return 2 * self.tokens

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, token_loss, token_correct = bit_loss(logits, targets.bool(), self.token_weights)
        return loss, torch.cat([token_loss, token_correct])

    def split_stats(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token loss sums, token correct sums)."""
        return stats[:self.tokens], stats[self.tokens:]

    def sliced(self, video: slice, scale: float) -> "SlicedBitObjective":
        """The objective of a context-parallel rank holding video tokens `video` (parallel/cp.py)."""
        return SlicedBitObjective(self, video, scale)


@dataclass(frozen=True)
class SlicedBitObjective:
    """A context-parallel rank's part of `BitObjective`: the loss over its video tokens times `scale` (its share
    of the sample's mean), statistics full-size with zeros outside its tokens (summed over the cp group)."""

    base: BitObjective
    video: slice
    scale: float

    @property
    def stats_size(self) -> int:
        return self.base.stats_size

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.base.token_weights
        loss, token_loss, token_correct = bit_loss(logits, targets[:, self.video].bool(),
                                                   None if w is None else w[self.video])
        n = self.base.tokens
        stats = token_loss.new_zeros(2 * n)
        stats[self.video] = token_loss
        stats[n + self.video.start:n + self.video.stop] = token_correct
        return loss * self.scale, stats

    def split_stats(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.split_stats(stats)


def breakdown(token_loss: torch.Tensor, token_correct: torch.Tensor, samples: int, latent_dim: int,
              frame_ids: torch.Tensor, scale_ids: torch.Tensor) -> dict[str, float]:
    """Per-scale and per-frame losses and the overall bit accuracy from per-token sums (one device-to-host copy)."""
    token_loss, token_correct = token_loss.cpu(), token_correct.cpu()
    out = {"bit_acc": float(token_correct.sum() / (samples * latent_dim * token_loss.numel()))}
    for name, ids in (("scale", scale_ids), ("frame", frame_ids)):
        for i in range(int(ids.max()) + 1):
            sel = ids == i
            out[f"loss_{name}{i}"] = float(token_loss[sel].sum() / (samples * sel.sum()))
    return out
