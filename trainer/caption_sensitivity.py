"""Does the model read each word of its caption? (issue 15) The teacher-forced bit loss of held-out clips under
their true captions, against the same clips captioned with one attribute swapped (direction: its opposite; colour:
the next colour of the world). The gap, in nats per bit, is ~0 when the model ignores the word and grows as it
learns to use it. No sampling: one forward per variant, so it is far less noisy than the accuracies of 16 sampled
videos, and it tells a direction miss caused by the model not reading the word (gap ~0) from one the sampler
loses (gap > 0, accuracy low). Direction is scored on the latent frames after the first (the motion), colour on
every frame."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from common.train_config import StageConfig
from data_pipeline.clips import read_caption, to_model_input
from data_pipeline.synth import DIRECTIONS
from data_pipeline.video_io import read_video
from models.objective import prepare_batch, sample_generator
from models.text_encoder import TextEncoder
from models.videoar import VideoAR
from trainer.video_metrics import parse_caption

OPPOSITE = {name: next(o for o, w in DIRECTIONS.items() if w == (-v[0], -v[1])) for name, v in DIRECTIONS.items()}
SWAPPED = ("direction", "color")


def swap_caption(caption: str, attribute: str, colors: tuple[str, ...]) -> str | None:
    """The caption with its first object's `attribute` swapped (direction -> opposite, colour -> the next of
    `colors` that no other object has), or None when the caption is not a synthetic-world one."""
    objects = parse_caption(caption)
    if not objects:
        return None
    first = objects[0]
    if attribute == "direction":
        return re.sub(rf"\bmoving {re.escape(first['direction'])}(?![\w-])", f"moving {OPPOSITE[first['direction']]}",
                      caption, count=1)
    taken = {o["color"] for o in objects}
    i = colors.index(first["color"]) if first["color"] in colors else -1
    new = next((c for c in colors[i + 1:] + colors[:i + 1] if c not in taken), None)
    return None if new is None else re.sub(rf"\b{first['color']}\b", new, caption, count=1)


@torch.no_grad()
def token_losses(model: VideoAR, quantizer, stage: StageConfig, latents: torch.Tensor, text_states: torch.Tensor
                 ) -> torch.Tensor:
    """(N, L_video) mean per-bit loss of each sample's video tokens, plain teacher forcing (no flips, no frame
    mask, no condition dropout; the stage's attention window stays, it is part of the model), run in the stage's
    micro-batches (its memory bound)."""
    layout = model.layout_for(latents.shape[1], quantizer.sizes)
    plain = dataclasses.replace(stage, p_mask=0.0)
    out = []
    for i in range(0, len(latents), max(1, stage.micro_batch)):
        lat, states = latents[i:i + stage.micro_batch], text_states[i:i + stage.micro_batch]
        gens = [sample_generator(0, -1, j) for j in range(i, i + len(lat))]
        batch = prepare_batch(quantizer, layout, lat, states, plain, 0.0, 0.0, 0.0, 0.0, gens)
        logits = model(*batch.model_args()).float()
        per_bit = F.cross_entropy(logits.reshape(-1, 2), batch.targets.reshape(-1).long(), reduction="none")
        out.append(per_bit.view(batch.targets.shape).mean(2))
    return torch.cat(out)


def gap_table(gap: torch.Tensor, layout) -> list[list[float]]:
    """Per-token gaps (L_video,) -> their mean per [latent frame][scale] (one layout block each): where the model
    reads a word (e.g. a direction read only on the first moving frame's coarse scales, or nowhere)."""
    P, K = layout.prefix_len, len(layout.sizes)
    means = [round(float(gap[b.start - P:b.end - P].mean()), 6) for b in layout.blocks]
    return [means[t * K:(t + 1) * K] for t in range(layout.num_frames)]


@torch.no_grad()
def caption_gaps(model: VideoAR, quantizer, stage: StageConfig, text_encoder: TextEncoder, latents: torch.Tensor,
                 captions: list[str], colors: tuple[str, ...], tables: dict[str, list] | None = None
                 ) -> dict[str, float]:
    """{quality/direction_gap, quality/color_gap}: loss under the swapped captions minus loss under the true ones,
    nats per bit, over the clips (latents (N, T, d, h, w)) whose caption can be swapped; {} when none can.
    `tables`, when given, receives each attribute's `gap_table` (by latent frame and scale)."""
    out = {}
    device = next(model.parameters()).device
    layout = model.layout_for(latents.shape[1], quantizer.sizes)
    frame_ids = layout.token_ids()[0][layout.prefix_len:].to(device)
    swaps = {a: {i: s for i, c in enumerate(captions) if (s := swap_caption(c, a, colors)) is not None}
             for a in SWAPPED}
    if layout.num_frames < 2:  # no motion to read a direction from
        swaps["direction"] = {}
    scored = sorted(set().union(*swaps.values()))  # every clip with a swapped caption: its true loss, once
    if not scored:
        return out
    lat = latents[scored].to(device)
    row = {i: r for r, i in enumerate(scored)}
    true = token_losses(model, quantizer, stage, lat, text_encoder.encode([captions[i] for i in scored]).to(device))
    for attribute, swapped in swaps.items():
        if not swapped:
            continue
        rows = [row[i] for i in swapped]
        states = text_encoder.encode(list(swapped.values())).to(device)
        gap = (token_losses(model, quantizer, stage, lat[rows], states) - true[rows]).mean(0)
        where = (frame_ids >= 1) if attribute == "direction" else torch.ones_like(frame_ids, dtype=torch.bool)
        out[f"quality/{attribute}_gap"] = float(gap[where].mean())
        if tables is not None:
            tables[attribute] = gap_table(gap, layout)
    return out


def clip_latents(tokenizer, clips: list[Path], stage: StageConfig) -> tuple[torch.Tensor, list[str]]:
    """(latents (N, T, d, h, w), captions) of the first `stage.frames` frames of each clip long enough."""
    device = next(tokenizer.parameters()).device
    lats, captions = [], []
    for clip in clips:
        frames = read_video(clip, num_frames=stage.frames, size=tuple(stage.resolution))
        if len(frames) < stage.frames:
            continue
        z = tokenizer.encode_latent(to_model_input(frames).to(device))  # (1, d, T, h, w)
        lats.append(z.transpose(1, 2))
        captions.append(read_caption(clip))
    return (torch.cat(lats) if lats else torch.empty(0)), captions
