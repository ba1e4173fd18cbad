"""Preprocessing metrics: clips/s, bytes/s and quarantine counts through the trainer's sinks (JSONL + TensorBoard)
in the local `<run.dir>/preprocess/`, while the shards go to S3."""

from __future__ import annotations

import json
import shutil

import pytest

from data_pipeline.object_store import open_store
from data_pipeline.preprocess import preprocess
from tests.conftest import make_cfg
from common.metrics import read_jsonl

GOOD = 3  # clips of 13 frames -> 2 clips of 5 frames each
STAGE = ("curriculum=[{name: s, until_step: 3, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 2}]")


def test_final_metrics_equal_the_summary_and_the_manifest(s3_endpoint, clips_dir, tokenizer_ckpt, tmp_path):
    import boto3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    videos = tmp_path / "videos"
    videos.mkdir()
    for i, path in enumerate(sorted(clips_dir.glob("*.mp4"))[:GOOD]):
        shutil.copy(path, videos / path.name)
        (videos / path.with_suffix(".json").name).write_text(json.dumps({"caption": "c", "class": i}))
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "text.mp4").write_bytes(b"this is not a video at all")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="metrics")
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, f"preprocess.input={videos}",
                   "preprocess.output=s3://metrics/out", f"data.endpoint_url={s3_endpoint}",
                   "preprocess.shard_bytes=4096", "preprocess.workers=1", "preprocess.batch_size=2")
    summary = preprocess(cfg, progress=False)

    out = open_store("s3://metrics/out", s3_endpoint)
    shards = json.loads(out.read("manifest.json"))["buckets"]["32x32x5"]["shards"]
    records = read_jsonl(tmp_path / "run" / "preprocess" / "metrics.jsonl")
    last = records[-1]
    assert len(records) >= 2 and [r["step"] for r in records] == sorted(r["step"] for r in records)
    assert last["step"] == last["inputs_done"] == last["inputs_total"] == summary.inputs == GOOD + 2
    assert last["clips"] == summary.clips == sum(s["samples"] for s in shards) == 2 * GOOD
    assert last["quarantined"] == summary.quarantined == len(json.loads(out.read("quarantine.json"))) == 2
    assert last["shards"] == summary.shards == len(shards) > 1
    assert last["bytes"] == summary.bytes == sum(s["bytes"] for s in shards)
    assert last["clips_per_s"] == pytest.approx(last["clips"] / last["work_s"], rel=1e-3)
    assert last["bytes_per_s"] == pytest.approx(last["bytes"] / last["work_s"], rel=1e-3)
    # the rates leave out Ray's start-up, which the elapsed time includes
    assert last["startup_s"] > 0 and last["startup_s"] + last["work_s"] == pytest.approx(last["elapsed_s"], abs=2e-3)
    tb = EventAccumulator(str(tmp_path / "run" / "preprocess" / "tensorboard"))
    tb.Reload()
    for tag in ("clips", "quarantined"):
        final = tb.Scalars(tag)[-1]
        assert (final.step, final.value) == (last["step"], last[tag])
