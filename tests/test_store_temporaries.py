"""Temporary objects left by killed writes (local hidden temps) or by old S3 writers that ran out of retries
(`.tmp-` keys) are removed once older than the age limit, which leaves a concurrent writer's in-flight temp
alone; committed objects are never touched. S3 against a real S3-speaking server (moto)."""

from __future__ import annotations

import os
import time

from data_pipeline.object_store import open_store


def test_local_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path):
    store = open_store(tmp_path)
    store.write("b/shard-000000.tar", b"committed")
    old, fresh = tmp_path / "b" / ".shard-000001.tmp-123-abcdef12.tar", tmp_path / "b" / ".x.tmp-9-00000000.tar"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"in flight")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.stale_temporaries(3600) == ["b/.shard-000001.tmp-123-abcdef12.tar"]
    assert store.clean_temporaries() == 1
    assert not old.exists() and fresh.exists() and store.read("b/shard-000000.tar") == b"committed"
    assert [k for k, _ in store.list()] == ["b/shard-000000.tar"]


def test_s3_tmp_keys_are_removed_by_age(s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="tmpkeys")
    store = open_store("s3://tmpkeys/out", s3_endpoint)
    store.write("b/shard-000000.tar", b"committed")
    store.write("b/shard-000001.tar.tmp-77-deadbeef", b"left by a writer that ran out of retries")
    assert store.stale_temporaries(3600) == []  # just written: could be in flight
    time.sleep(1.5)  # S3's LastModified has one-second resolution
    assert store.stale_temporaries(0) == ["b/shard-000001.tar.tmp-77-deadbeef"]
    assert store.clean_temporaries(min_age_s=0) == 1
    assert store.stale_temporaries(0) == [] and [k for k, _ in store.list()] == ["b/shard-000000.tar"]
    assert store.read("b/shard-000000.tar") == b"committed"
