"""Object-storage faults: the S3 endpoint goes away in the middle of Ray preprocessing and comes back."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.object_store import open_store
from data_pipeline.preprocess import PROJECT_ROOT, input_id
from data_pipeline.synth import generate_clips
from tests.conftest import make_cfg, shard_offsets
from common.config import save_config

GOOD = 12  # clips of 13 frames -> 2 clips of 5 frames each
BAD = {"empty.mp4": b"", "text.mp4": b"this is not a video at all"}
STAGE = ("curriculum=[{name: s, until_step: 3, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 2}]")
OUTAGE_S = 4


class RestartableS3:
    """`tests/restartable_s3.py` in a subprocess, driven through its stdin."""

    def __init__(self, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("restartable_s3.py")), str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        self._expect_ok("start")

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        self._expect_ok(cmd)

    def _expect_ok(self, cmd: str) -> None:
        answer = self.proc.stdout.readline().strip()
        assert answer == "ok", f"restartable S3 server, {cmd}: {answer or 'exited'}"

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = RestartableS3(tmp_path / "s3-server.log")
    yield server
    server.close()


def keys_of(s3, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preprocessing_rides_out_an_s3_outage(s3_server, clips_dir, tokenizer_ckpt, tmp_path):
    """Inputs and shards on S3; as soon as the job writes its first object to the output bucket, the S3 endpoint
    stops for a few seconds and comes back. The outage is a stop and restart of the HTTP server (listening socket
    closed, connections in flight cut, so clients get connection refused or reset) with the objects kept in the
    server process's memory: moto has no persistent storage, so this is an endpoint outage, not a loss of data.
    The Ray workers (reading inputs) and the driver (writing shards and records) ride it out through the client's
    retries: the job succeeds, every good clip is in the manifest exactly once, in shards whose bytes match the
    manifest, the bad inputs are quarantined, and no temporary object is left behind."""
    import boto3

    endpoint = s3_server.endpoint
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for b in ("videos", "shards"):
        s3.create_bucket(Bucket=b)
    generate_clips(tmp_path / "clips", GOOD, frames=13, size=32, fps=8, seed=1, progress=False)
    src = open_store("s3://videos/in", endpoint)
    good = sorted((tmp_path / "clips").glob("*.mp4"))
    for i, path in enumerate(good):
        src.write(path.name, path.read_bytes())
        src.write(path.with_suffix(".json").name, json.dumps({"caption": "c", "class": i % 8}).encode())
    for name, data in BAD.items():
        src.write(name, data)
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, "preprocess.input=s3://videos/in",
                   "preprocess.output=s3://shards/out", f"data.endpoint_url={endpoint}",
                   "preprocess.shard_bytes=4096", "preprocess.workers=2", "preprocess.batch_size=2")
    save_config(cfg, tmp_path / "preprocess.yaml")
    log = tmp_path / "preprocess.log"
    with log.open("w") as f:
        job = subprocess.Popen([sys.executable, "-m", "data_pipeline.preprocess", "--config",
                                str(tmp_path / "preprocess.yaml")], cwd=PROJECT_ROOT, stdout=f,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not keys_of(s3, "shards"):  # the first write (a progress record or its temp object): under way
            assert job.poll() is None, f"preprocessing ended before any progress:\n{log.read_text()}"
            assert time.time() < deadline, f"no progress after 120 s:\n{log.read_text()}"
            time.sleep(0.1)
        s3_server.command("stop")
        assert job.poll() is None
        time.sleep(OUTAGE_S)
        assert job.poll() is None, f"preprocessing ended during the outage:\n{log.read_text()}"
        s3_server.command("start")
        assert job.wait(timeout=150) == 0, log.read_text()
    finally:
        if job.poll() is None:  # the job and the local Ray runtime it started
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    out = open_store("s3://shards/out", endpoint)
    manifest = json.loads(out.read("manifest.json"))
    bucket = manifest["buckets"]["32x32x5"]
    keys = [o[0] for s in bucket["shards"] for o in shard_offsets(out, s)]
    sizes = dict(src.list())
    expected = {f"{input_id(p.name, sizes[p.name])}_{start:06d}" for p in good for start in (0, 5)}
    assert len(keys) == len(set(keys)) == bucket["samples"] == len(expected) == 2 * GOOD
    assert set(keys) == expected
    # the shard objects are exactly the manifest's (nothing encoded twice), each complete
    listed = [k for k, _ in out.list("32x32x5/")]
    assert sorted(k for k in listed if k.endswith(".tar")) == sorted(s["name"] for s in bucket["shards"])
    assert sorted(k for k in listed if not k.endswith(".tar")) == sorted(s["index"] for s in bucket["shards"])
    for s in bucket["shards"]:
        data = out.read(s["name"])
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    quarantine = json.loads(out.read("quarantine.json"))
    assert sorted(q["input"] for q in quarantine) == sorted(src.join(name) for name in BAD)
    leftovers = [k for b in ("videos", "shards") for k in keys_of(s3, b) if ".tmp-" in k]
    assert not leftovers


def trained_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "videoar" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line] if path.is_file() else []


def ledger(run_dir: Path) -> list[list[str]]:
    return [json.loads(line)["keys"] for line in (run_dir / "videoar" / "samples" / "rank-00000.jsonl").read_text()
            .splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_training_rides_out_an_s3_outage_and_consumes_every_sample_once(s3_server, clips_dir, tokenizer_ckpt,
                                                                         tmp_path):
    """Training streams its shards from S3; after step 5 the endpoint stops for a few seconds and comes back.
    The loader's reads ride it out through the client's retries (a log line per failed attempt): the run ends,
    its sample ledger (keys per step) and losses equal those of a run without the outage, so every sample was
    consumed exactly once and in order."""
    from data_pipeline.preprocess import preprocess

    import boto3

    endpoint = s3_server.endpoint
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for b in ("videos", "shards"):
        s3.create_bucket(Bucket=b)
    src = open_store("s3://videos/in", endpoint)
    for i, path in enumerate(sorted(clips_dir.glob("*.mp4"))):
        src.write(path.name, path.read_bytes())
        src.write(path.with_suffix(".json").name, json.dumps({"caption": "c", "class": i % 8}).encode())
    stage = STAGE.replace("until_step: 3", "until_step: 40").replace("global_batch: 4", "global_batch: 2")
    common = [stage, "preprocess.input=s3://videos/in", "preprocess.output=s3://shards/out",
              f"data.endpoint_url={endpoint}", "data.shards=s3://shards/out", "preprocess.workers=1",
              "videoar_train.sample_ledger=true", "videoar_train.log_every=1", "videoar_train.ckpt_every=100"]
    preprocess(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "pre", *common), progress=False)
    runs = {}
    for name in ("steady", "outage"):
        run_dir = tmp_path / name
        save_config(make_cfg(clips_dir, tokenizer_ckpt, run_dir, *common), tmp_path / f"{name}.yaml")
        log = tmp_path / f"{name}.log"
        with log.open("w") as f:
            job = subprocess.Popen([sys.executable, "-m", "trainer.train_videoar", "--config",
                                    str(tmp_path / f"{name}.yaml")], cwd=PROJECT_ROOT, stdout=f,
                                   stderr=subprocess.STDOUT)
        try:
            if name == "outage":
                deadline = time.time() + 120
                while len(trained_steps(run_dir)) < 5:
                    assert job.poll() is None, log.read_text()
                    assert time.time() < deadline, log.read_text()
                    time.sleep(0.05)
                s3_server.command("stop")
                time.sleep(OUTAGE_S)
                assert job.poll() is None, f"training ended during the outage:\n{log.read_text()}"
                s3_server.command("start")
            assert job.wait(timeout=240) == 0, log.read_text()
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        runs[name] = (ledger(run_dir), [r["loss"] for r in trained_steps(run_dir)], log.read_text())
    (keys, losses, _), (out_keys, out_losses, out_log) = runs["steady"], runs["outage"]
    assert len(keys) == 40 and out_keys == keys
    assert out_losses == pytest.approx(losses, rel=1e-6)
    assert "failed (" in out_log and "retrying with backoff" in out_log  # the outage was seen and said
