"""Preprocessing into S3 shards with a real S3 server (moto) and a local Ray runtime; the resumable loader; the
trainer reading S3 shards."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.clips import to_model_input
from data_pipeline.loader import ShardSet, rank_samples
from data_pipeline.object_store import open_store
from data_pipeline.preprocess import input_id, preprocess
from data_pipeline.video_io import read_video, write_video
from tests.conftest import make_cfg, shard_offsets
from data_pipeline.tokenizer_ckpt import load_tokenizer
from trainer.train_videoar import VideoARTrainer

GOOD = 4  # clips of 13 frames -> 2 clips of 5 frames each
NOT_VIDEOS = ("audio_only.m4a", "notes.md")  # inputs without a video extension
STAGE = ("curriculum=[{name: s, until_step: 3, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 2}]")


def audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def encoded(tmp_path, name, frames) -> bytes:
    write_video(tmp_path / name, frames, fps=8)
    return (tmp_path / name).read_bytes()


@pytest.fixture(scope="module")
def s3_shards(s3_endpoint, clips_dir, tokenizer_ckpt, tmp_path_factory):
    """Good clips (with class sidecars) and malformed files uploaded to s3://videos/in, preprocessed into
    s3://shards/out by a local Ray runtime."""
    import boto3

    tmp = tmp_path_factory.mktemp("inputs")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for b in ("videos", "shards"):
        s3.create_bucket(Bucket=b)
    src = open_store("s3://videos/in", s3_endpoint)
    good = sorted(clips_dir.glob("*.mp4"))[:GOOD]
    for i, path in enumerate(good):
        src.write(path.name, path.read_bytes())
        meta = json.loads(path.with_suffix(".json").read_text())
        src.write(path.with_suffix(".json").name, json.dumps({"caption": meta["caption"], "class": i}).encode())
    rng = np.random.default_rng(0)
    bad = {
        "empty.mp4": b"",
        "text.mp4": b"this is not a video at all",
        "truncated.mp4": good[0].read_bytes()[: good[0].stat().st_size // 3],
        "audio.mp4": audio_only_mp4(),
        "short.mp4": encoded(tmp, "short.mp4", rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)),
        "small.mp4": encoded(tmp, "small.mp4", rng.integers(0, 255, (13, 16, 16, 3), dtype=np.uint8)),
    }
    for name, data in bad.items():
        src.write(name, data)
    for name in NOT_VIDEOS:  # skipped for their extension, and said so
        src.write(name, b"not a video")
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp / "run", STAGE, "preprocess.input=s3://videos/in",
                   "preprocess.output=s3://shards/out", f"data.endpoint_url={s3_endpoint}",
                   "preprocess.shard_bytes=4096", "preprocess.workers=2", "preprocess.batch_size=2")
    summary = preprocess(cfg, progress=False)
    return cfg, summary, good, bad


def test_every_good_clip_once_and_every_bad_file_quarantined(s3_shards, s3_endpoint):
    cfg, summary, good, bad = s3_shards
    out = open_store("s3://shards/out", s3_endpoint)
    manifest = json.loads(out.read("manifest.json"))
    bucket = manifest["buckets"]["32x32x5"]
    keys = [o[0] for s in bucket["shards"] for o in shard_offsets(out, s)]
    src_sizes = dict(open_store("s3://videos/in", s3_endpoint).list())
    expected = {f"{input_id(p.name, src_sizes[p.name])}_{start:06d}" for p in good for start in (0, 5)}
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys)) == bucket["samples"] == 2 * GOOD
    assert len(bucket["shards"]) > 1  # tiny shard_bytes: several shards
    quarantine = {q["input"].rsplit("/", 1)[1]: q["reason"] for q in json.loads(out.read("quarantine.json"))}
    assert set(quarantine) == set(bad)
    assert "empty file" in quarantine["empty.mp4"]
    assert "no video stream" in quarantine["audio.mp4"]
    assert "too short" in quarantine["short.mp4"] and "too small" in quarantine["small.mp4"]
    assert "readable" in quarantine["text.mp4"]
    assert summary.clips == 2 * GOOD and summary.quarantined == len(bad)
    assert summary.not_videos == sorted(NOT_VIDEOS)  # listed, never silently dropped


def test_latents_equal_the_tokenizer_output(s3_shards, s3_endpoint, tokenizer_ckpt):
    cfg, _, good, _ = s3_shards
    data = ShardSet("s3://shards/out", "32x32x5", s3_endpoint)
    tok, _, _ = load_tokenizer(tokenizer_ckpt)
    checked = 0
    for i in range(len(data)):
        sample = data.fetch(i)
        meta = sample["json"]
        name = meta["source"].rsplit("/", 1)[1]
        path = next(p for p in good if p.name == name)
        frames = read_video(path, start=meta["start"], num_frames=5, size=(32, 32))
        with torch.no_grad():
            ref = tok.encode_latent(to_model_input(frames)).transpose(1, 2)[0]
        torch.testing.assert_close(torch.from_numpy(sample["latent.npy"]).float(), ref.half().float(),
                                   rtol=1e-2, atol=2e-3)  # float16 storage
        assert sample["cls"] == [p.name for p in good].index(name)
        checked += 1
    assert checked == 2 * GOOD


def test_second_run_writes_nothing_new(s3_shards, s3_endpoint):
    cfg, _, _, bad = s3_shards
    out = open_store("s3://shards/out", s3_endpoint)
    before = list(out.list())
    again = preprocess(cfg, progress=False)
    assert (again.clips, again.shards, again.skipped) == (0, 0, GOOD + len(bad))
    assert list(out.list()) == before


def test_plain_webdataset_reads_the_shards(s3_shards, s3_endpoint, tmp_path):
    out = open_store("s3://shards/out", s3_endpoint)
    manifest = json.loads(out.read("manifest.json"))
    shard = manifest["buckets"]["32x32x5"]["shards"][0]
    local = tmp_path / "shard.tar"
    local.write_bytes(out.read(shard["name"]))
    samples = list(wds.WebDataset(str(local), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [o[0] for o in shard_offsets(out, shard)]
    assert samples[0]["latent.npy"].dtype == np.float16 and samples[0]["latent.npy"].ndim == 4


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_one_epoch_over_ranks_is_every_sample_once(s3_shards, s3_endpoint, dp):
    data = ShardSet("s3://shards/out", "32x32x5", s3_endpoint)
    n, gb = len(data), 6 if len(data) % 6 == 0 else len(data)
    seen = []
    for step in range(n // gb):
        for rank in range(dp):
            seen += [data.key(i) for i in rank_samples(n, 0, step * gb, gb, rank, dp)]
    assert sorted(seen) == sorted(data.key(i) for i in range(n))


def test_a_batch_may_repeat_a_sample_across_an_epoch_boundary(s3_shards, s3_endpoint):
    data = ShardSet("s3://shards/out", "32x32x5", s3_endpoint)
    n = len(data)
    indices = rank_samples(n, 0, n - 2, 6, 0, 1)[:5] + [3, 3]  # crosses epochs 0 -> 1; sample 3 twice
    latents, cond = data.batch(indices)
    assert latents.shape[0] == cond.shape[0] == 7
    for a, i in enumerate(indices):
        for b, j in enumerate(indices):
            if i == j:
                assert torch.equal(latents[a], latents[b])


def test_resume_under_another_data_parallel_size(s3_shards, s3_endpoint):
    """Stop after 3 steps under dp=2; resume under dp=1 and dp=3: the remaining samples are exactly the
    uninterrupted run's (crossing an epoch boundary), none lost or repeated; each rank reads ~1/dp of the bytes."""
    data = ShardSet("s3://shards/out", "32x32x5", s3_endpoint)
    n, gb, steps, stop = len(data), 6, 5, 3

    def run(dp, first, last):
        out = []
        for step in range(first, last):
            out.append(sorted(k for r in range(dp) for k in
                              (data.key(i) for i in rank_samples(n, 7, step * gb, gb, r, dp))))
        return out

    reference = run(2, 0, steps)
    for dp in (1, 3):
        assert run(2, 0, stop) + run(dp, stop, steps) == reference
    readers = [ShardSet("s3://shards/out", "32x32x5", s3_endpoint) for _ in range(2)]
    for r, reader in enumerate(readers):
        reader.batch(rank_samples(n, 7, 0, gb, r, 2))
    total = sum(x.bytes_read for x in readers)
    assert all(abs(x.bytes_read - total / 2) <= total * 0.25 for x in readers)


def test_trainer_trains_from_s3_shards(s3_shards, s3_endpoint, clips_dir, tokenizer_ckpt, tmp_path, caplog):
    """Training and held-out evaluation read S3 shards (here the same ones: the path is what is tested); without
    data.eval_shards the evaluation is off and the trainer says so."""
    import logging

    from trainer.evaluate import eval_count
    from common.metrics import read_jsonl

    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "a", STAGE, "data.shards=s3://shards/out",
                   f"data.endpoint_url={s3_endpoint}", "videoar_train.eval_every=3",
                   "data.eval_shards=s3://shards/out")
    trainer = VideoARTrainer(cfg, progress=False)
    run = trainer.train()
    assert run.step == 3 and all(np.isfinite(run.losses))
    assert isinstance(trainer.loader.datasets[0], ShardSet) and trainer.loader.datasets[0].bytes_read > 0
    held = trainer.evaluator._data
    assert isinstance(held, ShardSet) and held.bytes_read > 0
    last = read_jsonl(tmp_path / "a" / "videoar" / "metrics.jsonl")[-1]
    assert last["eval/samples"] == eval_count(len(held), 1, 2)[0] > 0 and 0 < last["eval/loss"] < 0.7

    no_eval = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "b", STAGE, "data.shards=s3://shards/out",
                       f"data.endpoint_url={s3_endpoint}", "videoar_train.eval_every=3")
    with caplog.at_level(logging.WARNING, logger="train_videoar"):
        VideoARTrainer(no_eval, progress=False).train(max_steps=1)
    assert "data.shards is set without data.eval_shards: no held-out evaluation" in caplog.text
    assert not any("eval/loss" in r for r in read_jsonl(tmp_path / "b" / "videoar" / "metrics.jsonl"))


def test_interrupted_run_resumes_without_duplicates(s3_shards, s3_endpoint):
    """A crash after an input's shard was written but before its commit record (and before the manifest): the
    re-run encodes that input again and the manifest still lists every clip exactly once. (Runs last: it adds
    shards to the module's output.)"""
    cfg, _, good, _ = s3_shards
    out = open_store("s3://shards/out", s3_endpoint)
    src_sizes = dict(open_store("s3://videos/in", s3_endpoint).list())
    out.delete(f"_progress/inputs/{input_id(good[1].name, src_sizes[good[1].name])}.json")
    out.delete("manifest.json")
    again = preprocess(cfg, progress=False)
    assert again.clips == 2 and again.shards >= 1
    keys = [o[0] for s in json.loads(out.read("manifest.json"))["buckets"]["32x32x5"]["shards"]
            for o in shard_offsets(out, s)]
    assert len(keys) == len(set(keys)) == 2 * GOOD


def test_a_quarantined_input_replaced_by_a_good_one_leaves_the_quarantine_report(s3_shards, s3_endpoint):
    """quarantine.json is the latest outcome per input: text.mp4 replaced by a real clip (another size, another
    input id) is processed by the re-run and no longer reported. (Runs after the resume test: adds shards.)"""
    cfg, _, good, _ = s3_shards
    src, out = open_store("s3://videos/in", s3_endpoint), open_store("s3://shards/out", s3_endpoint)
    src.write("text.mp4", good[0].read_bytes())
    again = preprocess(cfg, progress=False)
    assert again.clips == 2 and again.quarantined == 0
    reported = {q["input"].rsplit("/", 1)[1] for q in json.loads(out.read("quarantine.json"))}
    assert "text.mp4" not in reported and "empty.mp4" in reported


def test_shard_indexes_are_read_lazily_and_v1_manifests_still_load(s3_shards, s3_endpoint, tmp_path):
    """Start-up reads the manifest only (per-shard counts); the first sample of a shard reads that shard's index
    once; a v1 manifest (byte ranges inline, before 2026-12-03) gives the same samples; a missing index is named."""
    import shutil

    out = open_store("s3://shards/out", s3_endpoint)
    ds = ShardSet("s3://shards/out", "32x32x5", s3_endpoint)
    bucket = ds.manifest["buckets"]["32x32x5"]  # earlier tests of this module may have added inputs
    assert ds.index.index_reads == 0 and len(ds) == bucket["samples"] >= 2 * GOOD and ds.manifest["format_version"] == 2
    first = ds.index.locate(0)
    assert ds.index.index_reads == 1 and ds.index.locate(1)[0] == first[0] and ds.index.index_reads == 1
    keys = [ds.key(i) for i in range(len(ds))]
    assert ds.index.index_reads == sum(s["samples"] > 0 for s in bucket["shards"])  # each shard's index once
    local = tmp_path / "local"
    for key, _ in out.list():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(out.read(key))
    v1 = json.loads((local / "manifest.json").read_text())
    v1["format_version"] = 1
    for s in v1["buckets"]["32x32x5"]["shards"]:
        s["offsets"] = shard_offsets(out, s)
        del s["index"]
    old = tmp_path / "v1"
    shutil.copytree(local, old)
    (old / "manifest.json").write_text(json.dumps(v1))
    for index in old.rglob("*.index.json"):
        index.unlink()
    legacy = ShardSet(str(old), "32x32x5")
    assert [legacy.key(i) for i in range(len(legacy))] == keys
    assert torch.equal(legacy.batch([0, 3])[0], ds.batch([0, 3])[0]) and legacy.index.index_reads == 0
    missing = sorted(local.rglob("*.index.json"))[0]
    missing.unlink()
    broken = ShardSet(str(local), "32x32x5")
    with pytest.raises(FileNotFoundError, match=r"index.json: the shard index the manifest names is missing"):
        [broken.key(i) for i in range(len(broken))]
