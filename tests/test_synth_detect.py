"""The synthetic world's detectors against the ground truth of real encoded clips (mp4 through PyAV): each must
score >= 0.95, and score low against wrong labels (a blind detector would not)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from data_pipeline import synth
from data_pipeline.synth_detect import color_mask, detect, direction, dominant_color, shape
from data_pipeline.video_io import read_video


def _scores(world: str, size: int, n: int, tmp_path) -> dict[str, float]:
    w = synth.WORLDS[world]
    specs = synth.generate_clips(tmp_path / f"{world}{size}", n, frames=9, size=size, seed=5, progress=False,
                                 world=world)
    ok, wrong, track_err = collections.Counter(), collections.Counter(), []
    objects = 0
    for s in specs:
        meta = json.loads(s.json_path.read_text())
        frames = read_video(s.path)
        ranked = sorted(w.colors, key=lambda c: -sum(int(color_mask(f, c).sum()) for f in frames))
        top = set(ranked[:len(meta["objects"])])
        if len(meta["objects"]) == 1:
            assert dominant_color(frames, w.colors) == ranked[0]
        for k, obj in enumerate(meta["objects"]):
            objects += 1
            det = detect(frames, obj["color"])
            ok["color"] += obj["color"] in top
            ok["present"] += det.present.mean()
            ok["direction"] += direction(det, size, size) == obj["direction"]
            got = collections.Counter(shape(f, obj["color"], w.shapes) for f in frames).most_common(1)[0][0]
            ok["shape"] += got == obj["shape"]
            track = np.asarray(meta["tracks"][k])
            err = (det.centers - track + size / 2) % size - size / 2
            track_err.append(np.abs(err[det.present]).max())
            # wrong labels: a colour not in the clip, another shape, the opposite direction
            absent = next(c for c in w.colors if all(o["color"] != c for o in meta["objects"]))
            wrong["present"] += detect(frames, absent).present.mean()
            wrong["shape"] += got == next(x for x in w.shapes if x != obj["shape"])
            ux, uy = synth.DIRECTIONS[obj["direction"]]
            opposite = next(d for d, v in synth.DIRECTIONS.items() if v == (-ux, -uy))
            wrong["direction"] += direction(det, size, size) == opposite
    return {**{k: v / objects for k, v in ok.items()}, **{f"wrong_{k}": v / objects for k, v in wrong.items()},
            "track_err_px": float(np.median(track_err))}


@pytest.mark.parametrize("world,size", [("easy", 32), ("easy", 64), ("medium", 64)])
def test_detectors_read_real_clips(world, size, tmp_path):
    s = _scores(world, size, 30, tmp_path)
    for k in ("color", "present", "direction", "shape"):
        assert s[k] >= 0.95, (k, s)
    for k in ("wrong_present", "wrong_direction", "wrong_shape"):
        assert s[k] <= 0.1, (k, s)
    assert s["track_err_px"] <= 1.5, s  # the sidecar's tracks are where the detector finds the object


def test_worlds_use_their_vocabulary_and_full_is_the_default(tmp_path):
    for world, wd in synth.WORLDS.items():
        for i in range(20):
            scene = synth.sample_clip(np.random.default_rng([0, i]), 64, 64, world)
            assert 1 <= len(scene["objects"]) <= wd.max_objects
            for obj in scene["objects"]:
                assert obj["color"] in wd.colors and obj["shape"] in wd.shapes and obj["direction"] in wd.directions
            assert scene["background"]["kind"] in wd.backgrounds
    easy = synth.caption_for(synth.sample_clip(np.random.default_rng([0, 1]), 64, 64, "easy"))
    assert easy.endswith("over a plain gray background") and " and " not in easy
    (spec,) = synth.generate_clips(tmp_path, 1, frames=3, size=32, progress=False)
    assert json.loads(spec.json_path.read_text())["world"] == "full"
    with pytest.raises(ValueError, match="world must be one of"):
        synth.generate_clips(tmp_path, 1, world="hard")
