"""A loopback Ray head (started here, stopped by its process group): preprocessing and a short training job
submitted through `jobs.ray` (the Jobs API; training through Ray Train) produce shards and a checkpoint."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from data_pipeline.ray_runtime import RAY_LOOPBACK_ENV
from tests.conftest import make_cfg, patched_environ
from common.config import save_config

STAGE = ("curriculum=[{name: s, until_step: 3, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 2}]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """Token auth stays on (Ray's default): a fresh token for this head, given to the clients via the env."""
    port, dashboard = free_port(), free_port()
    with patched_environ(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16)):
        env = {**os.environ, RAY_LOOPBACK_ENV: "0", "RAY_USAGE_STATS_ENABLED": "0"}  # loopback only
        ray_bin = str(Path(sys.executable).parent / "ray")
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # its own session dir: no clash with other Ray users
        proc = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                                 f"--temp-dir={temp_dir}",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
                                 "--include-dashboard=true"], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 300
        probe = [sys.executable, "-c",
                 f"from ray.job_submission import JobSubmissionClient as C; C({address!r}).list_jobs()"]
        while subprocess.run(probe, capture_output=True).returncode != 0:  # a fresh process: no cached Ray auth state
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("the Ray head did not come up")
            time.sleep(1)
        yield address
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)  # Ray shuts down slowly (30-60 s); the group is killed after
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_preprocess_and_train_through_the_jobs_api(ray_head, clips_dir, tokenizer_ckpt, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, p in enumerate(sorted(clips_dir.glob("*.mp4"))[:4]):
        (inputs / p.name).write_bytes(p.read_bytes())
        meta = json.loads(p.with_suffix(".json").read_text())
        (inputs / p.with_suffix(".json").name).write_text(json.dumps({"caption": meta["caption"], "class": i}))
    shards = tmp_path / "shards"
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, f"preprocess.input={inputs}",
                   f"preprocess.output={shards}", "preprocess.workers=1", f"data.shards={shards}", "run.threads=1")
    save_config(cfg, tmp_path / "cfg.yaml")

    def cli(*args):  # the real command line, in its own process (Ray keeps per-process auth state)
        res = subprocess.run([sys.executable, "-m", "jobs.ray", "submit", *args, "--address", ray_head, "--config",
                              str(tmp_path / "cfg.yaml"), "--wait"], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "SUCCEEDED" in res.stdout

    cli("preprocess")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["buckets"]["32x32x5"]["samples"] == 8  # 4 videos x 2 clips

    cli("train", "--workers", "2")
    step = tmp_path / "run" / "videoar" / "checkpoints" / "step-00000003"
    meta = json.loads((step / "metadata.json").read_text())
    assert meta["step"] == 3 and meta["layout"]["dp"] == 2
    assert (step / "rank-00000.pt").is_file() and (step / "rank-00001.pt").is_file()
