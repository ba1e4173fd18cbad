"""Detectors for the synthetic world, built from its own rendering rules (data_pipeline/synth.py), so generated
videos can be scored against their captions without any downloaded weights.

Per frame, an object colour's mask is the pixels near its RGB value (objects are drawn opaque in their exact
colour; backgrounds are darker tones). From the mask: presence (enough pixels), the centre (circular mean, since
objects wrap around the borders), the shape (best IoU with the world's shapes rendered at the mask's centre and
size) and, over frames, the direction of motion (mean wrapped displacement, nearest of the 8 directions).
tests/test_synth_detect.py checks them against the ground truth of real encoded clips (>= 0.95).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_pipeline.synth import COLORS, DIRECTIONS, SHAPES, signed_distance

COLOR_TOLERANCE = 70.0  # RGB distance: survives yuv420 chroma subsampling and anti-aliased edges
MIN_AREA_FRAC = 0.004  # of the frame: below this the object is absent (easy-world objects cover ~10%)


@dataclass(frozen=True)
class Detection:
    present: np.ndarray  # (T,) bool
    centers: np.ndarray  # (T, 2) x, y (nan where absent)
    areas: np.ndarray  # (T,) pixels


def color_mask(frame: np.ndarray, color: str) -> np.ndarray:
    """(H, W) bool: pixels of `frame` (H, W, 3 uint8) within COLOR_TOLERANCE of the colour."""
    diff = frame.astype(np.float32) - np.asarray(COLORS[color], np.float32)
    return np.sqrt((diff ** 2).sum(-1)) < COLOR_TOLERANCE


def _circular_mean(coords: np.ndarray, period: int) -> float:
    angle = 2 * np.pi * coords / period
    return float(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) % (2 * np.pi) * period / (2 * np.pi))


def detect(frames: np.ndarray, color: str) -> Detection:
    """Presence, centre and area of the `color` object in every frame of (T, H, W, 3) uint8."""
    t, h, w = frames.shape[:3]
    present, centers, areas = np.zeros(t, bool), np.full((t, 2), np.nan), np.zeros(t)
    for i, frame in enumerate(frames):
        ys, xs = np.nonzero(color_mask(frame, color))
        areas[i] = len(xs)
        if len(xs) >= MIN_AREA_FRAC * h * w:
            present[i] = True
            centers[i] = _circular_mean(xs + 0.5, w), _circular_mean(ys + 0.5, h)
    return Detection(present, centers, areas)


def dominant_color(frames: np.ndarray, colors: tuple[str, ...] = tuple(COLORS)) -> str:
    """The object colour covering the most pixels over the clip."""
    return max(colors, key=lambda c: sum(int(color_mask(f, c).sum()) for f in frames))


def direction(det: Detection, height: int, width: int) -> str | None:
    """Nearest of the 8 directions to the mean per-frame displacement (wrapped), None if never seen moving."""
    steps = []
    for a, b, pa, pb in zip(det.centers[:-1], det.centers[1:], det.present[:-1], det.present[1:]):
        if pa and pb:
            d = (b - a + np.array([width, height]) / 2) % np.array([width, height]) - np.array([width, height]) / 2
            steps.append(d)
    if not steps:
        return None
    dx, dy = np.mean(steps, axis=0)
    if math.hypot(dx, dy) < 0.2:  # no clear motion
        return None
    return max(DIRECTIONS, key=lambda name: (DIRECTIONS[name][0] * dx + DIRECTIONS[name][1] * dy)
               / math.hypot(*DIRECTIONS[name]))


def shape_ious(frame: np.ndarray, color: str, shapes: tuple[str, ...] = SHAPES) -> dict[str, float] | None:
    """Per shape, the best IoU of its rendering (at the mask's centre, size searched) with the colour's mask;
    None when the colour is absent from the frame."""
    mask = color_mask(frame, color)
    h, w = mask.shape
    if mask.sum() < MIN_AREA_FRAC * h * w:
        return None
    ys, xs = np.nonzero(mask)
    cx, cy = _circular_mean(xs + 0.5, w), _circular_mean(ys + 0.5, h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = (xx - cx + w / 2) % w - w / 2, (yy - cy + h / 2) % h - h / 2
    r0 = math.sqrt(mask.sum() / math.pi)
    best = dict.fromkeys(shapes, -1.0)
    for name in shapes:
        for r in r0 * np.linspace(0.7, 1.6, 10):
            for oy in (-1.0, 0.0, 1.0):  # a triangle's centroid is not its centre: try small offsets
                t = signed_distance(name, dx, dy - oy * r / 4, r) < 0
                best[name] = max(best[name], (t & mask).sum() / max(1, (t | mask).sum()))
    return best


def shape(frame: np.ndarray, color: str, shapes: tuple[str, ...] = SHAPES) -> str | None:
    """The shape whose rendering best overlaps the colour's mask in one frame."""
    ious = shape_ious(frame, color, shapes)
    return None if ious is None else max(ious, key=ious.get)


def clip_shape(frames: np.ndarray, color: str, shapes: tuple[str, ...] = SHAPES) -> str | None:
    """The shape with the highest IoU summed over the frames where the colour is present: steadier than a
    per-frame vote when a small object is ambiguous in single frames (a 5 px circle vs square)."""
    total = dict.fromkeys(shapes, 0.0)
    seen = False
    for frame in frames:
        ious = shape_ious(frame, color, shapes)
        if ious is not None:
            seen = True
            for name, iou in ious.items():
                total[name] += iou
    return max(total, key=total.get) if seen else None
