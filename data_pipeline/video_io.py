"""Video I/O on top of PyAV: probe, frame-accurate read, atomic H.264 write, contact sheets.

Every failure to read a file surfaces as :class:`VideoDecodeError` whose message starts with the path, so the
data pipeline can put it into a quarantine report without knowing anything about FFmpeg error types.
"""

from __future__ import annotations

import contextlib
import logging
import os
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

import av
import numpy as np

from common.atomic import atomic_path

log = logging.getLogger(__name__)

_AV_ERRORS = (av.error.FFmpegError, OSError, EOFError)


class VideoDecodeError(ValueError):
    """A file that cannot be used as a video; the message starts with the path and says why."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    has_audio: bool


@contextlib.contextmanager
def _open_video(path: str) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open `path` and yield (container, first video stream), turning every failure into VideoDecodeError."""
    try:
        if os.path.getsize(path) == 0:
            raise VideoDecodeError(f"{path}: empty file (0 bytes)")
        container = av.open(path, mode="r")
    except VideoDecodeError:
        raise
    except FileNotFoundError as exc:
        raise VideoDecodeError(f"{path}: file not found") from exc
    except _AV_ERRORS as exc:
        raise VideoDecodeError(f"{path}: not a readable video ({_describe(exc)})") from exc
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise VideoDecodeError(f"{path}: no video stream (contains: {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream
    except _AV_ERRORS as exc:
        raise VideoDecodeError(f"{path}: decoding failed ({_describe(exc)})") from exc
    finally:
        container.close()


def _describe(exc: BaseException) -> str:
    """FFmpeg's reason; the detailed log line (e.g. 'moov atom not found') only exists if av.logging is enabled."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    detail = getattr(exc, "log", None)
    return f"{text}: {detail[2].strip()}" if detail and len(detail) > 2 and detail[2] else text


def _stream_fps(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read the header (and count frames only if the header does not say) so callers can filter cheaply."""
    path = str(path)
    with _open_video(path) as (container, stream):
        num_frames = stream.frames if stream.frames and stream.frames > 0 else sum(1 for _ in container.decode(stream))
        if num_frames <= 0:
            raise VideoDecodeError(f"{path}: video stream has zero frames")
        fps = _stream_fps(stream)
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = num_frames / fps if fps else 0.0
        return VideoInfo(path, stream.codec_context.width, stream.codec_context.height, fps, num_frames, duration,
                         has_audio=bool(container.streams.audio))


def _target_geometry(src_h: int, src_w: int, size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, crop_h, crop_w): scale to cover the crop box, keeping the aspect ratio."""
    crop_h, crop_w = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
    if crop_h <= 0 or crop_w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    scale = max(crop_h / src_h, crop_w / src_w)
    return max(crop_h, round(src_h * scale)), max(crop_w, round(src_w * scale)), crop_h, crop_w


def _to_rgb(frame: av.VideoFrame, size: int | tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    res_h, res_w, crop_h, crop_w = _target_geometry(frame.height, frame.width, size)
    rgb = frame.reformat(width=res_w, height=res_h, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (res_h - crop_h) // 2, (res_w - crop_w) // 2
    return rgb[top : top + crop_h, left : left + crop_w]


def _decode_sequential(container, stream, start: int, stop: int | None) -> tuple[list[av.VideoFrame], int]:
    """Frames [start, stop) by counting decoded frames; also returns how many frames were seen."""
    frames, seen = [], 0
    for frame in container.decode(stream):
        if seen >= start:
            frames.append(frame)
        seen += 1
        if stop is not None and seen >= stop:
            break
    return frames, seen


def _decode_seeking(container, stream, start: int, stop: int | None) -> tuple[list[av.VideoFrame], int] | None:
    """Frames [start, stop) after a keyframe seek, indexed by pts; None when pts cannot be trusted.

    Frame 0's pts comes from decoding it (not stream.start_time, which edit lists and some muxers skew).
    """
    fps, time_base = _stream_fps(stream), stream.time_base
    first = next(iter(container.decode(stream)), None)
    if not fps or time_base is None or first is None or first.pts is None:
        return None
    start_pts = first.pts
    target_pts = start_pts + int(Fraction(start) / Fraction(fps) / time_base)
    container.seek(target_pts, stream=stream, backward=True, any_frame=False)
    frames, expected = [], None
    last_index = -1
    for frame in container.decode(stream):
        if frame.pts is None:
            return None
        index = round(float((frame.pts - start_pts) * time_base) * fps)
        if expected is None and index > start:
            return None  # seek landed after the target (bad index or timestamps): cannot trust pts
        if expected is not None and index != expected:
            return None  # gap or duplicate: pts index != decode order, so count instead
        expected, last_index = index + 1, index
        if index >= start:
            frames.append(frame)
        if stop is not None and index + 1 >= stop:
            break
    return (frames, last_index + 1) if expected is not None else None


def read_video(path: str | os.PathLike, start: int = 0, num_frames: int | None = None,
               size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Decode frames [start, start+num_frames) as uint8 (T, H, W, 3) RGB; all frames from start if num_frames is None.

    `size=S` resizes the shorter side to S and center-crops S x S; `size=(H, W)` resizes to cover and crops to H x W.
    Frame `start` is the start-th decoded frame; for start > 0 we seek to the preceding keyframe and use pts.
    """
    path = str(path)
    if start < 0 or (num_frames is not None and num_frames <= 0):
        raise ValueError(f"{path}: invalid frame range start={start}, num_frames={num_frames}")
    stop = None if num_frames is None else start + num_frames
    with _open_video(path) as (container, stream):
        result = _decode_seeking(container, stream, start, stop) if start > 0 else None
        if result is None:
            if start > 0:
                log.debug("%s: pts-based seek unusable, decoding sequentially", path)
                container.seek(0, stream=stream, backward=True, any_frame=False)
            result = _decode_sequential(container, stream, start, stop)
        frames, available = result
        wanted = f"{start}..{stop - 1}" if stop is not None else f"{start}.."
        if (stop is not None and len(frames) < num_frames) or not frames:
            raise VideoDecodeError(f"{path}: has {available} frames, requested frames {wanted}")
        return np.stack([_to_rgb(f, size) for f in frames])


def _as_uint8_frames(path: str, frames) -> np.ndarray:
    if hasattr(frames, "detach"):  # torch tensor without importing torch
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or array.shape[0] == 0:
        raise ValueError(f"{path}: frames must be non-empty uint8 (T, H, W, 3), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def _write_video(path, frames, fps: float, crf: int, codec_options: dict[str, str] | None = None) -> None:
    path = str(path)
    array = _as_uint8_frames(path, frames)
    _, height, width, _ = array.shape
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264/yuv420p needs even height and width, got {height}x{width}")
    rate = Fraction(fps).limit_denominator(100_000)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # one x264 thread: the same frames always give the same bytes (seen once to differ under load)
            stream.options = {"crf": str(crf), "threads": "1", **(codec_options or {})}
            for index, rgb in enumerate(array):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = index
                frame.time_base = 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))


def write_video(path: str | os.PathLike, frames, fps: float = 8, crf: int = 18) -> None:
    """Write uint8 (T, H, W, 3) RGB frames (numpy or torch) as H.264 yuv420p .mp4, atomically."""
    _write_video(path, frames, fps, crf)


def write_contact_sheet(path: str | os.PathLike, rows: Sequence[np.ndarray] | np.ndarray, max_frames: int = 8,
                        labels: Sequence[str] | None = None, label_chars: int = 0, min_cell: int = 0) -> None:
    """PNG grid, one clip per row with up to `max_frames` evenly spaced frames, for eyeballing data and samples.

    Layout: 2 px gaps around every cell; label column (if any) on the left, each label wrapped at `label_chars`
    characters (0: one line), so a whole caption stays readable; cells sized to the largest frame, small frames
    enlarged (nearest) to at least `min_cell` pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    gap = 2
    clips = [rows] if isinstance(rows, np.ndarray) and rows.ndim == 4 else list(rows)
    clips = [_as_uint8_frames(str(path), clip) for clip in clips]
    if not clips:
        raise ValueError(f"{path}: contact sheet needs at least one row")
    if labels is not None and len(labels) != len(clips):
        raise ValueError(f"{path}: {len(labels)} labels for {len(clips)} rows")
    zoom = max(1, -(-min_cell // max(c.shape[1] for c in clips)))
    clips = [c.repeat(zoom, axis=1).repeat(zoom, axis=2) for c in clips] if zoom > 1 else clips
    cell_h = max(c.shape[1] for c in clips)
    cell_w = max(c.shape[2] for c in clips)
    ncols = min(max_frames, max(c.shape[0] for c in clips))
    font = ImageFont.load_default()
    if labels is not None:
        labels = ["\n".join(textwrap.wrap(str(t), label_chars)) if label_chars else str(t) for t in labels]
    label_w = max(int(font.getbbox(line)[2]) for t in labels for line in t.splitlines() or [""]) + 2 * gap \
        if labels else 0
    sheet = Image.new("RGB", (label_w + ncols * (cell_w + gap) + gap, len(clips) * (cell_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for row, clip in enumerate(clips):
        y = gap + row * (cell_h + gap)
        if labels:
            draw.multiline_text((gap, y + 2), labels[row], fill="black", font=font, spacing=2)
        picks = np.linspace(0, len(clip) - 1, min(ncols, len(clip))).round().astype(int)
        for col, index in enumerate(picks):
            sheet.paste(Image.fromarray(clip[index]), (label_w + gap + col * (cell_w + gap), y))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
