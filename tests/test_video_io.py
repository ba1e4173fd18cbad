"""video_io: lossy round trip, frame-accurate seeking, resize/crop geometry, error wrapping, contact sheets."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from data_pipeline import video_io
from data_pipeline.video_io import VideoDecodeError, probe_video, read_video, write_contact_sheet, write_video

BITS = 5  # frame index is written as 5 black/white blocks of 8x8 pixels in the top row


def _smooth_clip(frames: int = 12, height: int = 48, width: int = 64) -> np.ndarray:
    """Gradients plus a soft moving blob: easy for H.264, so the reconstruction error should be small."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    clip = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        blob = 120 * np.exp(-((xx - 10 - 3 * t) ** 2 + (yy - height / 2) ** 2) / 60)
        clip[t, ..., 0] = np.clip(60 + 2 * xx + blob, 0, 255)
        clip[t, ..., 1] = np.clip(40 + 3 * yy, 0, 255)
        clip[t, ..., 2] = np.clip(200 - 2 * xx + 0.5 * blob, 0, 255)
    return clip


def _indexed_clip(frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Slowly drifting background (no scene cuts) with the frame index in binary blocks along the top."""
    clip = _smooth_clip(frames, height, width)
    for t in range(frames):
        for bit in range(BITS):
            clip[t, :8, bit * 8 : bit * 8 + 8] = 255 if (t >> bit) & 1 else 0
    return clip


def _decoded_index(frame: np.ndarray) -> int:
    return sum(1 << bit for bit in range(BITS) if frame[2:6, bit * 8 + 2 : bit * 8 + 6].mean() > 128)


def _write_audio_only(path) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_round_trip_shape_dtype_and_error(tmp_path):
    clip = _smooth_clip()
    path = tmp_path / "sub" / "clip.mp4"
    write_video(path, clip, fps=8, crf=18)
    decoded = read_video(path)
    assert decoded.shape == clip.shape and decoded.dtype == np.uint8
    mean_abs_error = np.abs(decoded.astype(np.int16) - clip).mean()
    assert mean_abs_error < 4.0, mean_abs_error
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.mp4"]  # no temp file left behind


def test_write_accepts_torch_and_overwrites_atomically(tmp_path):
    import torch  # a pinned dependency: never skipped
    path = tmp_path / "clip.mp4"
    write_video(path, np.zeros((3, 16, 16, 3), np.uint8))
    write_video(path, torch.from_numpy(_smooth_clip(5, 16, 16)))
    assert read_video(path).shape == (5, 16, 16, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_probe_video(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, _smooth_clip(10, 32, 48), fps=8)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames, info.fps, info.has_audio) == (48, 32, 10, 8.0, False)
    assert info.duration == pytest.approx(10 / 8, abs=0.2)
    assert info.path == str(path)


def test_seek_is_frame_accurate(tmp_path, monkeypatch):
    num = 20
    path = tmp_path / "gop.mp4"
    video_io._write_video(path, _indexed_clip(num), fps=8, crf=18, codec_options={"g": "4"})
    with av.open(str(path)) as container:
        keyframes = sum(p.is_keyframe for p in container.demux(container.streams.video[0]) if p.size)
    assert keyframes >= 4  # several GOPs, so starts inside a GOP need seek + decode-forward

    full = read_video(path)
    assert [_decoded_index(f) for f in full] == list(range(num))

    sequential_starts = []
    real_sequential = video_io._decode_sequential
    monkeypatch.setattr(
        video_io, "_decode_sequential",
        lambda c, s, start, stop: sequential_starts.append(start) or real_sequential(c, s, start, stop),
    )
    for start, count in [(1, 3), (3, 2), (4, 4), (5, 1), (7, 6), (11, 5), (16, 4), (19, 1)]:
        part = read_video(path, start=start, num_frames=count)
        assert np.array_equal(part, full[start : start + count]), start
        assert [_decoded_index(f) for f in part] == list(range(start, start + count))
    assert read_video(path, start=13).shape[0] == num - 13
    assert sequential_starts == []  # every start > 0 went through the pts-based seek path


@pytest.mark.parametrize(
    ("size", "shape"),
    [(32, (4, 32, 32, 3)), ((16, 24), (4, 16, 24, 3)), ((32, 96), (4, 32, 96, 3)), (16, (4, 16, 16, 3))],
)
def test_resize_shapes(tmp_path, size, shape):
    path = tmp_path / "wide.mp4"
    write_video(path, _smooth_clip(4, 32, 96))
    assert read_video(path, size=size).shape == shape


def test_center_crop_keeps_the_middle(tmp_path):
    clip = np.zeros((3, 32, 96, 3), np.uint8)
    clip[:, :, 32:64] = 255  # black | white | black thirds
    path = tmp_path / "thirds.mp4"
    write_video(path, clip)
    square = read_video(path, size=32).astype(np.float32)  # no scaling: exactly the white middle third
    assert square[:, :, 2:-2].mean() > 245
    # (16, 24): scale by 0.5 to 16x48, crop columns 12..36; white is resized columns 16..32 -> crop columns 4..20
    box = read_video(path, size=(16, 24)).astype(np.float32)
    assert box[:, :, 6:18].mean() > 240
    assert box[:, :, :2].mean() < 15 and box[:, :, -2:].mean() < 15
    tall = read_video(path, size=(32, 48)).astype(np.float32)  # scale 1, crop columns 24..72
    assert tall[:, :, 10:38].mean() > 245 and tall[:, :, :6].mean() < 10 and tall[:, :, -6:].mean() < 10


def _bad_files(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    good = tmp_path / "good.mp4"
    write_video(good, _smooth_clip(8, 32, 32))
    truncated = tmp_path / "truncated.mp4"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    audio = tmp_path / "tone.m4a"
    _write_audio_only(audio)
    return {"text": text, "truncated": truncated, "empty": empty, "audio": audio, "missing": tmp_path / "nope.mp4"}


@pytest.mark.parametrize("reader", [probe_video, read_video])
def test_bad_files_raise_video_decode_error_with_path(tmp_path, reader):
    reasons = {"empty": "empty", "audio": "no video stream", "missing": "not found", "text": "not a readable video"}
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(VideoDecodeError) as info:
            reader(path)
        message = str(info.value)
        assert message.startswith(f"{path}: "), message
        assert reasons.get(kind, "") in message, message
        assert not isinstance(info.value, av.error.FFmpegError)


def test_too_few_frames_names_counts(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, _smooth_clip(12, 32, 32))
    for start, count in [(0, 20), (10, 5), (30, 2)]:
        with pytest.raises(VideoDecodeError) as info:
            read_video(path, start=start, num_frames=count)
        assert str(info.value) == f"{path}: has 12 frames, requested frames {start}..{start + count - 1}"


def test_write_rejects_odd_sizes_and_bad_arrays(tmp_path):
    path = tmp_path / "odd.mp4"
    with pytest.raises(ValueError, match="even") as info:
        write_video(path, np.zeros((2, 31, 32, 3), np.uint8))
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="uint8"):
        write_video(path, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(path, np.zeros((32, 32, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_contact_sheet_layout_and_frame_choice(tmp_path):
    clips = [np.repeat(np.arange(5, dtype=np.uint8)[:, None, None, None] * 40 + row, 16 * 24 * 3).reshape(5, 16, 24, 3)
             for row in range(3)]
    path = tmp_path / "sheets" / "sheet.png"
    write_contact_sheet(path, clips, max_frames=4)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (4 * (24 + 2) + 2, 3 * (16 + 2) + 2)
        sheet = np.asarray(image.convert("RGB"))
    # cell (row r, col c) starts at (2 + r * 18, 2 + c * 26); 5 frames -> evenly spaced picks 0, 1, 3, 4
    picked = [[int(sheet[2 + r * 18 + 5, 2 + c * 26 + 5, 0]) for c in range(4)] for r in range(3)]
    assert picked == [[40 * i + r for i in (0, 1, 3, 4)] for r in range(3)]
    assert tuple(sheet[0, 0]) == (255, 255, 255)  # gap

    labelled = tmp_path / "labelled.png"
    write_contact_sheet(labelled, clips, max_frames=8, labels=["first", "second", "third"])
    with Image.open(labelled) as image:
        width, height = image.size
    assert height == 3 * 18 + 2 and width > 5 * (24 + 2) + 2 + 10  # all 5 frames plus a label column
    # a long caption wraps inside the label column; small frames are enlarged to min_cell
    wrapped = tmp_path / "wrapped.png"
    write_contact_sheet(wrapped, clips, max_frames=8, labels=["a red circle moving up over gray"] * 3,
                        label_chars=8, min_cell=48)
    with Image.open(wrapped) as image:
        assert image.size[1] == 3 * (48 + 2) + 2 and image.size[0] < 5 * (72 + 2) + 2 + 100
    wrapped.unlink()

    single = tmp_path / "single.png"
    write_contact_sheet(single, clips[0], max_frames=2)
    with Image.open(single) as image:
        assert image.size == (2 * 26 + 2, 18 + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.png", "sheets", "single.png"]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_seek_with_offset_timestamps(tmp_path, suffix):
    """Streams that do not start at pts 0 (and mkv, whose header has no frame count) still index from frame 0."""
    num, path = 16, tmp_path / f"offset{suffix}"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 48, "yuv420p", {"g": "4"}
        for index, rgb in enumerate(_indexed_clip(num)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index + 7
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert probe_video(path).num_frames == num
    assert [_decoded_index(f) for f in read_video(path)] == list(range(num))
    for start in (1, 4, 6, 9, 15):
        assert [_decoded_index(f) for f in read_video(path, start=start, num_frames=1)] == [start]
