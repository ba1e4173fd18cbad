"""Curriculum schedules as pure functions of the step; committed checkpoints with verified fallback."""

from __future__ import annotations

import json

import pytest
import torch

from common.validation import ConfigError
from tests.conftest import TINY
from parallel.checkpoint_format import committed_steps, load_latest, read_checkpoint, save_checkpoint, step_dir
from common.config import load_config
from data_pipeline.latent_set import LatentSet
from data_pipeline.loader import StreamingLoader
from trainer.curriculum import Curriculum, StageConfig


def two_stages() -> Curriculum:
    return Curriculum([StageConfig(name="a", until_step=10, global_batch=8, micro_batch=4, flip_start=0.0,
                                   flip_end=0.18),
                       StageConfig(name="b", until_step=30, global_batch=2, micro_batch=2, flip_start=0.25,
                                   flip_end=0.25)])


def test_stage_and_flip_schedule_are_pure_functions_of_the_step():
    c = two_stages()
    assert [c.index(s) for s in (0, 9, 10, 29, 30, 99)] == [0, 0, 1, 1, 1, 1]
    assert c.flip_p_max(0) == 0.0 and c.flip_p_max(9) == pytest.approx(0.18)  # ramp over the stage's 10 steps
    assert c.flip_p_max(3) == pytest.approx(0.06)
    assert c.flip_p_max(10) == c.flip_p_max(29) == 0.25
    assert c.total_steps == 30
    assert c.expected_consumed(0) == [0, 0]
    assert c.expected_consumed(4) == [32, 0]
    assert c.expected_consumed(13) == [80, 6]


def test_consumed_samples_are_checked_on_resume():
    """The data position is the loader's (samples consumed per stage); the curriculum checks it on resume."""
    c = two_stages()
    names = [s.name for s in c.stages]
    data = LatentSet(torch.zeros(20, 1, 1, 1, 1), torch.zeros(20, dtype=torch.long), [""] * 20)
    loader = StreamingLoader(names, seed=0, dp_rank=0, dp=1)
    for step in range(13):
        loader.set_stream(c.index(step), data)
        loader.next_batch(c.index(step), c.stage(step).global_batch)
    fresh = StreamingLoader(names, seed=0, dp_rank=0, dp=1)
    fresh.load_state_dict(loader.state_dict())
    c.check_consumed(fresh.consumed, 13)
    assert fresh.consumed == [80, 6]
    with pytest.raises(ValueError, match="curriculum mismatch at step 12"):
        two_stages().check_consumed(loader.state_dict()["consumed"], 12)
    renamed = StreamingLoader(["x", "b"], seed=0, dp_rank=0, dp=1)
    with pytest.raises(ValueError, match="data streams"):
        renamed.load_state_dict(loader.state_dict())


def joint_stages() -> Curriculum:
    """Stage I mixes 4 images (64x64, their own scales) with 4 clips per step; II is images only; III clips only."""
    return Curriculum([StageConfig(name="I", until_step=5, resolution=[32, 32], frames=5, scales=[1, 2, 4],
                                   global_batch=8, micro_batch=2, image_batch=4, image_resolution=[64, 64],
                                   image_scales=[1, 2, 4, 8], p_mask=0.2),
                       StageConfig(name="II", until_step=8, global_batch=4, micro_batch=2, image_batch=4),
                       StageConfig(name="III", until_step=10, global_batch=2, micro_batch=2)])


def test_joint_image_video_stages_have_a_data_stream_per_part():
    c = joint_stages()
    assert c.stream_names == ["I", "I-images", "II-images", "III"]
    video, image = c.stages[0].parts()
    assert (video.global_batch, video.frames, video.resolution, video.sizes[-1], video.p_mask) == (4, 5, [32, 32],
                                                                                                  (4, 4), 0.2)
    assert (image.global_batch, image.frames, image.resolution, image.sizes[-1], image.p_mask) == (4, 1, [64, 64],
                                                                                                  (8, 8), 0.0)
    assert [p.frames for p in c.stages[1].parts()] == [1] and c.stages[2].parts() == [c.stages[2]]
    assert [j for j, _ in c.stage_streams(0)] == [0, 1] and [j for j, _ in c.stage_streams(2)] == [3]
    assert c.expected_consumed(7) == [20, 20, 8, 0]
    assert c.expected_consumed(12) == [20, 20, 12, 8]


@pytest.mark.parametrize("stage, field", [
    ("{name: a, until_step: 5, resolution: [32, 32], frames: 5, scales: [1, 2, 4], global_batch: 4, micro_batch: 2, "
     "image_batch: 3}", "image_batch"),
    ("{name: a, until_step: 5, resolution: [32, 32], frames: 5, scales: [1, 2, 4], global_batch: 4, micro_batch: 2, "
     "image_batch: 6}", "image_batch"),
    ("{name: a, until_step: 5, resolution: [32, 32], frames: 5, scales: [1, 2, 4], image_batch: 4, "
     "image_resolution: [64, 64]}", "image_scales"),
    ("{name: a, until_step: 5, resolution: [32, 32], frames: 5, scales: [1, 2, 4], image_batch: 4, "
     "image_resolution: [36, 32], image_scales: [1, 2, 4]}", "image_resolution"),
])
def test_bad_image_parts_name_the_field(stage, field):
    with pytest.raises(ConfigError, match=rf"curriculum\[a\]\.{field}"):
        load_config(None, TINY + ["data.frames=5", f"curriculum=[{stage}]"])


@pytest.mark.parametrize("override, field", [
    ("curriculum=[{name: a, until_step: 5, resolution: [36, 32], frames: 5, scales: [1, 2, 4]}]", "resolution"),
    ("curriculum=[{name: a, until_step: 5, resolution: [32, 32], frames: 5, scales: [1, 2]}]", "scales"),
    ("curriculum=[{name: a, until_step: 5, resolution: [32, 32], frames: 6, scales: [1, 2, 4]}]", "frames"),
    ("curriculum=[{name: a, until_step: 5, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
     "global_batch: 6, micro_batch: 4}]", "global_batch"),
    ("curriculum=[{name: a, until_step: 5, scales: [1, 2, 4], resolution: [32, 32]}, "
     "{name: b, until_step: 5, scales: [1, 2, 4], resolution: [32, 32]}]", "until_step"),
])
def test_bad_stages_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, TINY + ["data.frames=5", override])


def test_default_curriculum_is_one_stage_from_the_data_settings():
    cfg = load_config(None, TINY + ["videoar_train.steps=7"])
    (s,) = cfg.curriculum
    assert (s.until_step, s.resolution, s.frames, s.scales) == (7, [32, 32], 5, [1, 2, 4])


def state(x: float) -> dict:
    return {"w": torch.full((3,), x), "step": torch.tensor(1), "nested": {"lr": 0.5, "names": ["a"]}}


def test_commit_latest_pointer_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"rank-00000.pt": state(step)}, {"note": "x"}, keep_last=2)
    assert committed_steps(tmp_path) == [3, 4]
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    meta, shards = load_latest(tmp_path)
    assert meta["step"] == 4 and meta["note"] == "x"
    assert torch.equal(shards["rank-00000.pt"]["w"], torch.full((3,), 4.0))
    # a directory without metadata.json (a crash before the commit marker) is not a checkpoint
    (tmp_path / "step-00000009").mkdir()
    assert committed_steps(tmp_path) == [3, 4]


def test_corrupted_newest_falls_back_to_the_previous(tmp_path, caplog):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"rank-00000.pt": state(step)}, {}, keep_last=3)
    shard = step_dir(tmp_path, 2) / "rank-00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_checkpoint(step_dir(tmp_path, 2))
    meta, shards = load_latest(tmp_path)
    assert meta["step"] == 1 and "checkpoint step 2 is unusable" in caplog.text and "falling back to step 1" in caplog.text


def test_shards_never_unpickle_code(tmp_path):
    """weights_only loading refuses arbitrary objects even when the checksum matches."""
    save_checkpoint(tmp_path, 1, {"rank-00000.pt": {"obj": torch.nn.Linear(1, 1)}}, {})
    with pytest.raises(ValueError, match="rank-00000.pt: refused.*torch.nn.modules.linear.Linear, not an allowed"):
        read_checkpoint(step_dir(tmp_path, 1))


def test_wrong_format_is_refused(tmp_path):
    save_checkpoint(tmp_path, 1, {"rank-00000.pt": state(1)}, {})
    meta_path = step_dir(tmp_path, 1) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="v99"):
        read_checkpoint(step_dir(tmp_path, 1))


def test_digests_are_xxh3_and_old_sha256_checkpoints_still_verify(tmp_path):
    """New checkpoints name their digest (xxh3-128 of each file, computed while writing); a checkpoint written
    before (no `digest` field, sha256 sums) still loads, and a flipped byte fails either way."""
    import hashlib

    import xxhash

    save_checkpoint(tmp_path, 1, {"rank-00000.pt": state(1)}, {})
    d = step_dir(tmp_path, 1)
    meta = json.loads((d / "metadata.json").read_text())
    data = (d / "rank-00000.pt").read_bytes()
    assert meta["digest"] == "xxh3_128" and meta["shards"]["rank-00000.pt"] == xxhash.xxh3_128_hexdigest(data)
    legacy = {k: v for k, v in meta.items() if k != "digest"}
    legacy["shards"] = {"rank-00000.pt": hashlib.sha256(data).hexdigest()}
    (d / "metadata.json").write_text(json.dumps(legacy))
    _, shards = read_checkpoint(d)
    assert torch.equal(shards["rank-00000.pt"]["w"], state(1)["w"])
    for m in (legacy, meta):
        (d / "metadata.json").write_text(json.dumps(m))
        (d / "rank-00000.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(ValueError, match="checksum mismatch"):
            read_checkpoint(d)
        (d / "rank-00000.pt").write_bytes(data)


def test_a_token_budget_picks_the_largest_micro_batch_that_fits_and_divides():
    from trainer.curriculum import resolve_micro_batches

    tokens = {"long": 300, "short": 100, "short-images": 40}
    of = lambda part: tokens[part.name]  # noqa: E731
    long = StageConfig(name="long", global_batch=16, micro_batch_tokens=1000)  # 3 fit, 8 per rank: 2 divides
    short = StageConfig(name="short", global_batch=24, image_batch=12, micro_batch_tokens=450)  # 4 fit, 6 each: 3
    plain = StageConfig(name="plain", global_batch=8, micro_batch=2)
    got = resolve_micro_batches([long, short, plain], 2, of)
    assert [s.micro_batch for s in got] == [2, 3, 2] and got[2] is plain
    with pytest.raises(ConfigError, match=r"curriculum\[long\]\.micro_batch_tokens=200: one sample already has 300"):
        resolve_micro_batches([StageConfig(name="long", global_batch=16, micro_batch_tokens=200)], 2, of)
