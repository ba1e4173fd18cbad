"""Deterministic synthetic captioned videos (moving shapes over textured backgrounds) for demos and tests.

Clip i of a run with seed s is drawn from ``np.random.default_rng([s, i])``, so it does not depend on how many
clips are generated; rendering is pure numpy, so the same clip renders bit-identically everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_write_text
from data_pipeline.video_io import write_video

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "orange": (245, 140, 30),
    "purple": (145, 60, 200),
    "cyan": (40, 205, 215),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "ring", "diamond")
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy) in image coordinates (y grows downwards)
    "right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1),
    "up-right": (1, -1), "up-left": (-1, -1), "down-right": (1, 1), "down-left": (-1, 1),
}
SPEEDS = {"slowly": 0.75, "": 1.5, "quickly": 2.5}  # pixels per frame at 64 px; caption adverb -> speed
BACKGROUNDS = {"stripes": "striped", "checkerboard": "checkered", "gradient": "gradient", "plain": "plain"}
BACKGROUND_ONLY_COLORS = {"gray": (110, 110, 110)}  # never an object's colour


@dataclass(frozen=True)
class World:
    """What a clip may contain (`--world`): the easier the world, the fewer clips a small model needs."""
    colors: tuple[str, ...]  # object colours
    shapes: tuple[str, ...]
    directions: tuple[str, ...]
    speeds: tuple[str, ...]  # caption adverbs, keys of SPEEDS
    backgrounds: tuple[str, ...]  # keys of BACKGROUNDS
    background_colors: tuple[str, ...]
    max_objects: int
    radius: tuple[float, float]  # object size as a fraction of min(height, width)
    scroll_p: float  # probability that the background scrolls


WORLDS = {
    # one large object, 4 colours x 3 shapes x 4 directions, plain gray background: 48 captions; the fast speed,
    # so that motion is more than a latent cell per latent frame (a tiny model ignores a slower one)
    "easy": World(("red", "green", "blue", "yellow"), ("circle", "square", "triangle"), ("right", "left", "up", "down"),
                  ("quickly",), ("plain",), ("gray",), 1, (0.16, 0.2), 0.0),
    "medium": World(("red", "green", "blue", "yellow", "purple", "cyan"), ("circle", "square", "triangle", "ring"),
                    tuple(DIRECTIONS), ("slowly", "quickly"), ("plain", "gradient", "stripes"), ("gray",), 2,
                    (0.12, 0.18), 0.0),
    "full": World(tuple(COLORS), SHAPES, tuple(DIRECTIONS), tuple(SPEEDS), ("stripes", "checkerboard", "gradient"),
                  tuple(COLORS), 3, (0.09, 0.15), 0.5),
}


def color_rgb(name: str) -> tuple[int, int, int]:
    return COLORS[name] if name in COLORS else BACKGROUND_ONLY_COLORS[name]


@dataclass(frozen=True)
class ClipSpec:
    path: Path
    json_path: Path
    caption: str
    frames: int
    height: int
    width: int
    fps: float
    seed: int
    index: int


def sample_clip(rng: np.random.Generator, height: int, width: int, world: str = "full") -> dict[str, Any]:
    """Random scene description (JSON-serialisable) of `world`; rendering and caption follow from it alone. The
    `full` world draws exactly what it always did, so its clips are unchanged."""
    wd = WORLDS[world]
    scale = min(height, width) / 64
    bg_color = str(rng.choice(list(wd.background_colors)))
    kind = str(rng.choice(list(wd.backgrounds)))
    scrolls = bool(rng.random() < wd.scroll_p)
    scroll_dir = DIRECTIONS[str(rng.choice(list(DIRECTIONS)[:4]))]
    background = {
        "kind": kind,
        "color": bg_color,
        "period": round(max(8.0, float(rng.uniform(16, 32) * scale)), 2),  # coarse enough for an f=8 tokenizer demo
        "angle": float(rng.choice([0, 45, 90, 135])),
        "scroll": [0.5 * scale * d for d in scroll_dir] if scrolls else [0.0, 0.0],
    }
    object_colors = rng.permutation([c for c in wd.colors if c != bg_color])
    objects = []
    for k in range(int(rng.integers(1, wd.max_objects + 1))):
        adverb = str(rng.choice(list(wd.speeds)))
        objects.append({
            "shape": str(rng.choice(list(wd.shapes))),
            "color": str(object_colors[k]),
            "direction": str(rng.choice(list(wd.directions))),
            "speed": SPEEDS[adverb] * scale,
            "speed_word": adverb,
            "radius": round(float(rng.uniform(*wd.radius) * min(height, width)), 2),
            "x": round(float(rng.uniform(0, width)), 2),
            "y": round(float(rng.uniform(0, height)), 2),
        })
    return {"objects": objects, "background": background}


def object_center(obj: dict[str, Any], t: int, height: int, width: int) -> tuple[float, float]:
    """(x, y) of an object's centre at frame t (straight line, wrapped around the borders)."""
    ux, uy = DIRECTIONS[obj["direction"]]
    norm = math.hypot(ux, uy)
    return ((obj["x"] + obj["speed"] * ux / norm * t) % width, (obj["y"] + obj["speed"] * uy / norm * t) % height)


def scene_tracks(scene: dict[str, Any], frames: int, height: int, width: int) -> list[list[list[float]]]:
    """Per object, its centre [x, y] in every frame: the ground truth the video metrics score against."""
    return [[[round(c, 2) for c in object_center(obj, t, height, width)] for t in range(frames)]
            for obj in scene["objects"]]


def caption_for(scene: dict[str, Any]) -> str:
    """English caption naming every object's colour, shape and direction, and the background."""
    parts = []
    for obj in scene["objects"]:
        moving = f"{obj['speed_word']} moving" if obj["speed_word"] else "moving"
        article = "an" if obj["color"][0] in "aeiou" else "a"
        parts.append(f"{article} {obj['color']} {obj['shape']} {moving} {obj['direction']}")
    bg = scene["background"]
    scrolling = "scrolling " if any(bg["scroll"]) else ""
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if bg["kind"] == "plain":
        return f"{objects} over a plain {bg['color']} background"
    described = f"{scrolling}{bg['color']} {BACKGROUNDS[bg['kind']]}"
    return f"{objects} over {'an' if described[0] in 'aeiou' else 'a'} {described} background"


def _background(bg: dict[str, Any], t: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W, 3) float texture in [0, 1]: two tones of the background colour, shifted by t * scroll."""
    x, y = xx - bg["scroll"][0] * t, yy - bg["scroll"][1] * t
    theta = math.radians(bg["angle"])
    u = x * math.cos(theta) + y * math.sin(theta)
    period = bg["period"]
    if bg["kind"] == "plain":
        level = np.full_like(u, 0.5)
    elif bg["kind"] == "stripes":
        level = np.clip(0.5 + 2.0 * np.sin(2 * np.pi * u / period), 0, 1)
    elif bg["kind"] == "checkerboard":
        level = np.clip(0.5 + 2.0 * np.sin(np.pi * x / period) * np.sin(np.pi * y / period), 0, 1)  # soft edges
    else:  # gradient: triangle wave so scrolling stays continuous
        phase = (u / (4 * period)) % 2
        level = np.where(phase < 1, phase, 2 - phase)
    color = np.asarray(color_rgb(bg["color"]), np.float64) / 255
    dark, light = 0.25 * color + 0.05, 0.6 * color + 0.1
    return dark + level[..., None] * (light - dark)


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) to a shape of size r centred at the origin."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.25 * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.2 * r) / math.sqrt(2)
    if shape == "triangle":  # upward-pointing equilateral, inradius 0.75 r: area 2.92 r^2, the square's 2.89 r^2
        s = math.sqrt(3) / 2
        return np.maximum.reduce([dy, s * dx - 0.5 * dy, -s * dx - 0.5 * dy]) - 0.75 * r
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(scene: dict[str, Any], frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3): objects move in straight lines and wrap around the borders (torus)."""
    # float64: np.sin's float32 SIMD and scalar loops differ by an ulp (which one runs depends on memory alignment),
    # enough to flip a rounded pixel, so the same clip could encode to different bytes
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        canvas = _background(scene["background"], t, yy, xx)
        for obj in scene["objects"]:
            cx, cy = object_center(obj, t, height, width)
            dx = (xx - cx + width / 2) % width - width / 2  # wrapped offsets: shapes reappear on the far side
            dy = (yy - cy + height / 2) % height - height / 2
            alpha = np.clip(0.5 - signed_distance(obj["shape"], dx, dy, obj["radius"]), 0, 1)[..., None]
            canvas = canvas * (1 - alpha) + alpha * (np.asarray(COLORS[obj["color"]], np.float64) / 255)
        out[t] = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    return out


def _existing(json_path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if all(meta.get(k) == v for k, v in expected.items()) else None


def generate_clips(
    out_dir: str | os.PathLike,
    num_clips: int,
    frames: int = 33,
    size: int | tuple[int, int] = 64,
    fps: float = 8,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    world: str = "full",
) -> list[ClipSpec]:
    """Write clip-XXXXX.mp4 + .json pairs; pairs that already exist with the same settings are kept (resumable)."""
    height, width = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
    if height % 2 or width % 2 or min(height, width) < 8:
        raise ValueError(f"size must be even and >= 8, got {height}x{width}")
    if world not in WORLDS:
        raise ValueError(f"world must be one of {list(WORLDS)}, got {world!r}")
    if frames < 1 or num_clips < 0:
        raise ValueError(f"need frames >= 1 and num_clips >= 0, got {frames}, {num_clips}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for index in tqdm(range(num_clips), desc="synth clips", unit="clip", disable=not progress):
        mp4, meta_path = out / f"clip-{index:05d}.mp4", out / f"clip-{index:05d}.json"
        expected = {"seed": seed, "index": index, "frames": frames, "height": height, "width": width,
                    "fps": float(fps), "world": world}
        meta = None if overwrite or not mp4.exists() else _existing(meta_path, expected)
        if meta is None:
            scene = sample_clip(np.random.default_rng([seed, index]), height, width, world)
            meta = {"caption": caption_for(scene), **expected, **scene,
                    "tracks": scene_tracks(scene, frames, height, width)}
            write_video(mp4, render_clip(scene, frames, height, width), fps=fps)
            atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")  # sidecar last: marks the pair complete
        specs.append(ClipSpec(mp4, meta_path, meta["caption"], frames, height, width, float(fps), seed, index))
    return specs


def _parse_size(text: str) -> int | tuple[int, int]:
    """'64' -> 64, '48x64' -> (48, 64) as (height, width)."""
    if "x" in text:
        h, w = text.lower().split("x", 1)
        return int(h), int(w)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.synth",
        description="Generate deterministic captioned synthetic videos (clip-XXXXX.mp4 + clip-XXXXX.json).",
    )
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--clips", type=int, required=True, help="number of clips to generate")
    parser.add_argument("--frames", type=int, default=33, help="frames per clip (default 33)")
    parser.add_argument("--size", type=_parse_size, default=64, help="S (square) or HxW, even (default 64)")
    parser.add_argument("--fps", type=float, default=8, help="frame rate written into the mp4 (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="clip i is drawn from default_rng([seed, i])")
    parser.add_argument("--world", choices=list(WORLDS), default="full",
                        help="easy: one object, 4 colours x 3 shapes x 4 directions, plain background (learnable by "
                             "the tiny models in minutes); medium: up to 2 objects, more of each; full: everything")
    parser.add_argument("--overwrite", action="store_true", help="regenerate clips that already exist")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    specs = generate_clips(args.out, args.clips, frames=args.frames, size=args.size, fps=args.fps,
                           seed=args.seed, progress=not args.no_progress, overwrite=args.overwrite,
                           world=args.world)
    log.info("%d clips in %s", len(specs), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
