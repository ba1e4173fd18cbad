"""Credentials never leave the environment: with sentinel AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
RAY_AUTH_TOKEN values, a preprocessing run (Ray, into a real S3 server) + a training run streaming those shards +
sampling, each through its `python -m` entry point, leave the sentinels in no output line, no file of the run
directory (config dumps, metrics, TensorBoard events, checkpoints, samples), no log of the Ray session and no
object in the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.config import save_config
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parent.parent
SENTINELS = {"AWS_ACCESS_KEY_ID": "AKIASENTINEL0000042", "AWS_SECRET_ACCESS_KEY": "sentinel-secret-9f8e7d6c5b",
             "RAY_AUTH_TOKEN": "sentinel-ray-token-5c4b3a21"}
STAGE = ("curriculum=[{name: s, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 2, micro_batch: 1}]")


def run(args: list[str], env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def files_containing(root: Path, secrets: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets, vanished temp files
                continue
            hits += [f"{path}: {s.decode()}" for s in secrets if s in data]
    return hits


@pytest.mark.slow
def test_no_credential_reaches_a_log_a_file_or_the_store(s3_endpoint, clips_dir, tokenizer_ckpt, tmp_path):
    import boto3

    secrets = [v.encode() for v in SENTINELS.values()]
    env = {**os.environ, **SENTINELS, "AWS_DEFAULT_REGION": "us-east-1"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env["RAY_TMPDIR"] = str(ray_tmp)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=SENTINELS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=SENTINELS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for b in ("secret-in", "secret-out"):
        s3.create_bucket(Bucket=b)
    for i, path in enumerate(sorted(clips_dir.glob("*.mp4"))):
        s3.put_object(Bucket="secret-in", Key=path.name, Body=path.read_bytes())
        meta = json.loads(path.with_suffix(".json").read_text())
        s3.put_object(Bucket="secret-in", Key=path.with_suffix(".json").name,
                      Body=json.dumps({"caption": meta["caption"], "class": i}).encode())
    run_dir = tmp_path / "run"
    cfg = make_cfg(clips_dir, tokenizer_ckpt, run_dir, STAGE, f"data.endpoint_url={s3_endpoint}",
                   "preprocess.input=s3://secret-in", "preprocess.output=s3://secret-out", "preprocess.workers=1",
                   "data.shards=s3://secret-out", "videoar_train.eval_every=0", "run.tensorboard=true")
    config = tmp_path / "config.yaml"
    save_config(cfg, config)
    try:
        out = run(["data_pipeline.preprocess", "--config", str(config)], env)
        out += run(["trainer.train_videoar", "--config", str(config)], env)
        out += run(["trainer.sample", "--ckpt", str(run_dir / "videoar" / "checkpoints"), "--class-id", "1",
                    "--out", str(run_dir / "samples")], env)
        assert "clips written" in out and list((run_dir / "samples").rglob("*.mp4"))  # the runs did run
        assert [s.decode() for s in secrets if s in out.encode()] == []
        assert files_containing(run_dir, secrets) == [] and files_containing(tmp_path, secrets) == []
        assert files_containing(ray_tmp, secrets) == []
        assert list(ray_tmp.rglob("*.log")) or list(ray_tmp.rglob("*.out"))  # Ray's logs were looked at
        for bucket in ("secret-in", "secret-out"):
            for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                assert not [s for s in secrets if s in body], obj["Key"]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
