"""The encoder workers write the shards and the per-input commit records; the driver only merges their indexes
into the manifest, last. A crash between the workers' writes and the manifest, with an input's commit record
lost and an unrecorded shard left behind, is followed by a rerun that gives every input's samples exactly once
and leaves only the shards the manifest names."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import webdataset as wds

import data_pipeline.preprocess as preprocess_module
from data_pipeline.loader import ShardSet
from data_pipeline.object_store import open_store
from data_pipeline.preprocess import input_id, preprocess
from tests.conftest import make_cfg, shard_offsets

STAGE = ("curriculum=[{name: s, until_step: 3, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 2}]")
BUCKET = "32x32x5"


class SimulatedCrash(RuntimeError):
    pass


def cfg_for(clips_dir, tokenizer_ckpt, tmp_path, out):
    # ~3 inputs (2 clips each) per shard, so a lost commit record leaves a shard with live and dead samples
    return make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, f"preprocess.input={clips_dir}",
                    f"preprocess.output={out}", "preprocess.workers=2", "preprocess.batch_size=2",
                    "preprocess.shard_bytes=24000")


def manifest_keys(store) -> list[str]:
    bucket = json.loads(store.read("manifest.json"))["buckets"][BUCKET]
    return [o[0] for s in bucket["shards"] for o in shard_offsets(store, s)]


def test_workers_write_the_shards_and_a_rerun_after_a_crash_before_the_manifest_is_exactly_once(
        clips_dir, tokenizer_ckpt, tmp_path, monkeypatch):
    out_dir = tmp_path / "shards"
    out = open_store(out_dir)
    cfg = cfg_for(clips_dir, tokenizer_ckpt, tmp_path, out_dir)
    seen = {}

    def crash(store, buckets, tok_hash, shards, inputs):
        """The driver is about to write the manifest: what the workers wrote is there already; then it dies."""
        seen["tars"] = sorted(k for k, _ in store.list(f"{BUCKET}/") if k.endswith(".tar"))
        seen["shards"], seen["inputs"] = shards, inputs
        raise SimulatedCrash("killed before the manifest")

    monkeypatch.setattr(preprocess_module, "write_manifest", crash)
    with pytest.raises(SimulatedCrash):
        preprocess(cfg, progress=False)
    monkeypatch.undo()
    assert not out.exists("manifest.json")
    records = [json.loads(out.read(k)) for k, _ in out.list("_progress/shards/")]
    # every shard was written, indexed and recorded by an encoder worker process, none by the driver
    assert seen["tars"] == sorted(r["name"] for r in records) == sorted(r["name"] for r in seen["shards"])
    assert {r["worker"] for r in records} == {0, 1} and os.getpid() not in {r["pid"] for r in records}
    assert len({r["pid"] for r in records}) == 2
    for r in records:
        data = out.read(r["name"])
        assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"]
        assert json.loads(out.read(r["index"]))["offsets"] == r["offsets"]
    sizes = {p.name: p.stat().st_size for p in clips_dir.glob("*.mp4")}
    expected = sorted(f"{input_id(n, s)}_{start:06d}" for n, s in sizes.items() for start in (0, 5))
    assert sorted(o[0] for r in records for o in r["offsets"]) == expected
    commits = {r["id"]: r for r in (json.loads(out.read(k)) for k, _ in out.list("_progress/inputs/"))}
    assert len(commits) == len(sizes) and all(r["status"] == "ok" and r["clips"] == 2 for r in commits.values())
    assert all(set(r["shards"]) <= set(seen["tars"]) for r in commits.values())

    # worse: one input's commit record was lost too (its shard is recorded, mixed with other inputs'), and a worker
    # died between a tar and its record (an unrecorded shard, a copy of a recorded one)
    shared = next(r for r in records if len(r["inputs"]) > 1)
    lost = shared["inputs"][0]
    out.delete(f"_progress/inputs/{lost}.json")
    orphan = f"{BUCKET}/shard-w001-000900.tar"
    out.write(orphan, out.read(shared["name"]))

    again = preprocess(cfg, progress=False)
    assert again.skipped == len(sizes) - 1 and again.clips == 2 and again.total_samples == len(expected)
    keys = manifest_keys(out)
    assert sorted(keys) == expected and len(keys) == len(set(keys))  # each input's samples exactly once
    manifest = json.loads(out.read("manifest.json"))["buckets"][BUCKET]
    named = {s["name"] for s in manifest["shards"]}
    assert shared["name"] in named and orphan not in named and not out.exists(orphan)
    assert sorted(k for k, _ in out.list(f"{BUCKET}/") if k.endswith(".tar")) == sorted(named)  # no leftovers
    entry = next(s for s in manifest["shards"] if s["name"] == shared["name"])
    assert entry["samples"] == len(shared["offsets"]) - 2  # the lost input's old copy is out of its index
    assert all(not k.startswith(lost) for k in (o[0] for o in shard_offsets(out, entry)))
    data = ShardSet(str(out_dir), BUCKET)
    assert sorted(data.key(i) for i in range(len(data))) == expected
    sample = data.fetch(keys.index(next(k for k in keys if k.startswith(lost))))
    assert sample["__key__"].startswith(lost) and sample["latent.npy"].ndim == 4


def test_a_crash_with_every_input_committed_writes_the_manifest_from_the_records(clips_dir, tokenizer_ckpt,
                                                                                   tmp_path, monkeypatch):
    """Killed after the workers committed every input, before the manifest: the rerun encodes nothing and
    writes the manifest of every sample once; webdataset reads each shard the manifest names whole."""
    out_dir = tmp_path / "shards"
    cfg = cfg_for(clips_dir, tokenizer_ckpt, tmp_path, out_dir)
    monkeypatch.setattr(preprocess_module, "write_manifest", lambda *a: (_ for _ in ()).throw(SimulatedCrash()))
    with pytest.raises(SimulatedCrash):
        preprocess(cfg, progress=False)
    monkeypatch.undo()
    out = open_store(out_dir)
    tars_before = sorted(k for k, _ in out.list(f"{BUCKET}/") if k.endswith(".tar"))
    again = preprocess(cfg, progress=False)
    assert (again.clips, again.shards, again.skipped) == (0, 0, again.inputs) and again.total_samples == 16
    shards = json.loads(out.read("manifest.json"))["buckets"][BUCKET]["shards"]
    assert sorted(s["name"] for s in shards) == tars_before
    for s in shards:
        samples = list(wds.WebDataset(str(out_dir / s["name"]), shardshuffle=False))
        assert [x["__key__"] for x in samples] == [o[0] for o in shard_offsets(out, s)]
    assert len(manifest_keys(out)) == len(set(manifest_keys(out))) == 16


def test_an_output_of_driver_written_shards_resumes_exactly_once(clips_dir, tokenizer_ckpt, tmp_path):
    """Records of the driver-written format (commit records without their shards, shard records without index,
    inputs or worker) and a lost commit record: the rerun re-encodes that input only and the manifest lists every
    sample once; the old copy is dropped from its shard's rewritten index."""
    out_dir = tmp_path / "shards"
    out = open_store(out_dir)
    cfg = cfg_for(clips_dir, tokenizer_ckpt, tmp_path, out_dir)
    preprocess(cfg, progress=False)
    expected = sorted(manifest_keys(out))
    for key, _ in out.list("_progress/"):
        r = json.loads(out.read(key))
        legacy = {k: v for k, v in r.items() if k not in ("shards", "index", "inputs", "worker", "pid")}
        out.write(key, json.dumps(legacy).encode())
    lost = expected[0].rsplit("_", 1)[0]
    out.delete(f"_progress/inputs/{lost}.json")
    out.delete("manifest.json")
    again = preprocess(cfg, progress=False)
    assert again.clips == 2 and again.skipped == again.inputs - 1
    keys = manifest_keys(out)
    assert sorted(keys) == expected and len(keys) == len(set(keys))
    shards = json.loads(out.read("manifest.json"))["buckets"][BUCKET]["shards"]
    holder = [s for s in shards if any(o[0].startswith(lost) for o in shard_offsets(out, s))]
    assert len(holder) == 1 and holder[0]["samples"] == 2  # the new shard: the re-encoded input alone
