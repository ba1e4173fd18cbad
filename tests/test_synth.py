"""synth: deterministic per-clip content, truthful captions, decodable videos, real motion, idempotence, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import synth
from data_pipeline.video_io import probe_video, read_video

REPO = Path(__file__).resolve().parents[1]


def _meta(directory: Path, index: int) -> dict:
    return json.loads((directory / f"clip-{index:05d}.json").read_text())


def test_same_seed_same_clips_independent_of_clip_count(tmp_path):
    two = synth.generate_clips(tmp_path / "a", 2, frames=9, size=32, seed=3, progress=False)
    four = synth.generate_clips(tmp_path / "b", 4, frames=9, size=32, seed=3, progress=False)
    other_seed = synth.generate_clips(tmp_path / "c", 2, frames=9, size=32, seed=4, progress=False)
    assert [s.path.name for s in four] == [f"clip-{i:05d}.mp4" for i in range(4)]
    for i in range(2):
        assert _meta(tmp_path / "a", i) == _meta(tmp_path / "b", i)
        assert two[i].caption == four[i].caption == _meta(tmp_path / "a", i)["caption"]
        assert np.array_equal(read_video(two[i].path), read_video(four[i].path))
        assert (two[i].path.read_bytes() == four[i].path.read_bytes())  # encoder is deterministic too
    assert not all(np.array_equal(read_video(a.path), read_video(b.path)) for a, b in zip(two, other_seed))
    assert len({s.caption for s in four}) > 1  # clips differ from each other


def test_captions_describe_the_scene_in_the_json(tmp_path):
    specs = synth.generate_clips(tmp_path, 6, frames=5, size=32, seed=0, progress=False)
    for spec in specs:
        meta = json.loads(spec.json_path.read_text())
        assert meta["caption"] == spec.caption
        assert (meta["frames"], meta["height"], meta["width"], meta["fps"], meta["seed"]) == (5, 32, 32, 8.0, 0)
        assert 1 <= len(meta["objects"]) <= 3
        for obj in meta["objects"]:
            assert obj["shape"] in synth.SHAPES and obj["color"] in synth.COLORS
            assert obj["direction"] in synth.DIRECTIONS and obj["speed"] > 0
            assert f"{obj['color']} {obj['shape']}" in spec.caption
            assert f"moving {obj['direction']}" in spec.caption
        background = meta["background"]
        assert f"{background['color']} {synth.BACKGROUNDS[background['kind']]} background" in spec.caption
        assert background["color"] not in {obj["color"] for obj in meta["objects"]}


@pytest.mark.parametrize(("size", "hw"), [(32, (32, 32)), ((24, 40), (24, 40))])
def test_videos_decode_to_requested_frames_and_size(tmp_path, size, hw):
    (spec,) = synth.generate_clips(tmp_path, 1, frames=7, size=size, fps=12, progress=False)
    assert (spec.frames, spec.height, spec.width) == (7, *hw)
    info = probe_video(spec.path)
    assert (info.num_frames, info.height, info.width, info.fps) == (7, *hw, 12.0)
    frames = read_video(spec.path)
    assert frames.shape == (7, *hw, 3)
    # the rendered frames survive H.264: luma almost exactly; RGB pays for 4:2:0 chroma on saturated edges
    error = frames.astype(np.float32) - synth.render_clip(_meta(tmp_path, 0), 7, *hw)
    assert np.abs(error @ np.float32([0.299, 0.587, 0.114])).mean() < 3
    assert np.abs(error).mean() < 8


def test_object_moves_in_the_stated_direction_and_speed():
    scene = {
        "objects": [{"shape": "circle", "color": "red", "direction": "right", "speed": 2.0, "radius": 4.0,
                     "x": 8.0, "y": 16.0, "speed_word": ""}],
        "background": {"kind": "stripes", "color": "blue", "period": 6.0, "angle": 0.0, "scroll": [0.0, 0.0]},
    }
    frames = synth.render_clip(scene, 9, 32, 32)
    red = np.asarray(synth.COLORS["red"])
    centroids = []
    for frame in frames:
        ys, xs = np.nonzero(np.abs(frame.astype(int) - red).sum(-1) < 20)
        centroids.append((xs.mean() + 0.5, ys.mean() + 0.5))
    assert centroids[0] == pytest.approx((8.0, 16.0), abs=0.3)
    assert centroids[-1] == pytest.approx((8.0 + 2.0 * 8, 16.0), abs=0.3)
    assert synth.caption_for(scene) == "a red circle moving right over a blue striped background"


def test_generated_clips_have_motion(tmp_path):
    for spec in synth.generate_clips(tmp_path, 4, frames=9, size=32, seed=1, progress=False):
        frames = read_video(spec.path).astype(np.int16)
        assert np.abs(frames[-1] - frames[0]).mean() > 2.0, spec.caption
        assert np.abs(frames[-1] - frames[0]).max() > 100, spec.caption  # an object left / entered some pixels


def test_existing_clips_are_skipped_unless_overwrite(tmp_path):
    synth.generate_clips(tmp_path, 2, frames=5, size=32, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    (tmp_path / "clip-00001.json").unlink()  # an incomplete pair is regenerated
    synth.generate_clips(tmp_path, 2, frames=5, size=32, progress=False)
    assert (tmp_path / "clip-00000.mp4").stat().st_mtime_ns == stamps["clip-00000.mp4"]
    assert (tmp_path / "clip-00000.json").stat().st_mtime_ns == stamps["clip-00000.json"]
    assert (tmp_path / "clip-00001.json").exists()
    inode = (tmp_path / "clip-00000.mp4").stat().st_ino
    synth.generate_clips(tmp_path, 2, frames=5, size=32, progress=False, overwrite=True)
    assert (tmp_path / "clip-00000.mp4").stat().st_ino != inode  # replaced by a new file
    synth.generate_clips(tmp_path, 2, frames=7, size=32, progress=False)  # other settings: not reused
    assert _meta(tmp_path, 0)["frames"] == 7 and read_video(tmp_path / "clip-00000.mp4").shape[0] == 7
    expected_names = [f"clip-{i:05d}.{ext}" for i in range(2) for ext in ("json", "mp4")]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected_names  # no temp files left behind


def test_rejects_odd_size(tmp_path):
    with pytest.raises(ValueError, match="even"):
        synth.generate_clips(tmp_path, 1, size=33, progress=False)


def test_cli(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "data_pipeline.synth", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--clips" in help_run.stdout and "--seed" in help_run.stdout
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "data_pipeline.synth", "--out", str(out), "--clips", "2",
                          "--frames", "9", "--size", "32"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["clip-00000.json", "clip-00000.mp4",
                                                     "clip-00001.json", "clip-00001.mp4"]
    assert read_video(out / "clip-00001.mp4").shape == (9, 32, 32, 3)
    assert _meta(out, 1)["caption"] == _meta(out, 1)["caption"].strip() != ""
