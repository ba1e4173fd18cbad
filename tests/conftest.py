"""Shared fixtures: tiny configs, real H.264 clips and a tiny tokenizer made once per session (nothing is
downloaded)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.synth import generate_clips
from models.tokenizer import VideoTokenizer
from common.config import Config, load_config
from data_pipeline.tokenizer_ckpt import save_tokenizer

TINY = [
    "data.resolution=[32,32]", "data.frames=5", "data.synth_frames=13", "data.heldout_clips=2",
    "tokenizer.latent_dim=8", "tokenizer.spatial_compression=8", "tokenizer.temporal_compression=4",
    "tokenizer.base_channels=8", "tokenizer.channel_mult=[1,2,2]", "quantizer.scales=[1,2,4]",
]
VIDEOAR = [
    "videoar.preset=custom", "videoar.depth=2", "videoar.width=32", "videoar.heads=2", "videoar.cond=class",
    "videoar.num_classes=8", "videoar_train.log_every=1", "videoar_train.warmup_steps=2", "videoar_train.lr=1e-3",
]


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    generate_clips(out, 8, frames=13, size=32, fps=8, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tokenizer_ckpt(clips_dir, tmp_path_factory):
    """A randomly initialised tiny tokenizer: a fixed, deterministic encoder is all these tests need."""
    cfg = load_config(None, TINY + [f"data.clips_dir={clips_dir}"])
    torch.manual_seed(0)
    return save_tokenizer(VideoTokenizer(cfg.tokenizer, cfg.quantizer), cfg, tmp_path_factory.mktemp("tok"), 0)


def wait_for(predicate, what: str, timeout: float = 600) -> None:
    """Poll `predicate` every 0.5 s until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def make_cfg(clips_dir, tokenizer_ckpt, run_dir, *extra) -> Config:
    """TINY + a tiny class-conditioned VideoAR trained on the session clips with the session tokenizer."""
    return load_config(None, TINY + VIDEOAR + [f"data.clips_dir={clips_dir}", f"run.dir={run_dir}",
                                               f"videoar_train.tokenizer_ckpt={tokenizer_ckpt}", *extra])


@pytest.fixture
def tiny_cfg(clips_dir, tmp_path) -> Config:
    return load_config(None, TINY + [f"data.clips_dir={clips_dir}", f"run.dir={tmp_path / 'run'}"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-speaking HTTP server (moto_server, objects in memory) on a free loopback port, stopped by PID.
    Credentials are dummies set in the environment, as a user's would be."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}")
            time.sleep(0.1)
    with patched_environ(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"):
        yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@contextlib.contextmanager
def patched_environ(**values: str):
    """os.environ with `values` set inside the block, as it was (set or unset) after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def local_slurm(tmp_path_factory, nodes: int = 1):
    """Body of a module fixture: a SLURM cluster of `nodes` emulated nodes (jobs/slurm_local.sh: network
    namespaces), its client wrappers first on PATH and SLURM_CONF set while it runs; stopped by PID after."""
    state = tmp_path_factory.mktemp(f"slurm{nodes}")
    script = str(Path(__file__).resolve().parent.parent / "jobs" / "slurm_local.sh")
    res = subprocess.run(["bash", script, "start", str(state), str(nodes)], capture_output=True, text=True,
                         timeout=900)
    if res.returncode and "netns" in res.stderr and "Operation not permitted" in res.stderr:
        pytest.skip(f"cannot create network namespaces here: {res.stderr.strip()[-200:]}")
    assert res.returncode == 0, res.stderr + res.stdout
    try:
        with patched_environ(PATH=f"{state / 'bin'}:{os.environ['PATH']}", SLURM_CONF=str(state / "slurm.conf")):
            yield state
    finally:
        subprocess.run(["bash", script, "stop", str(state)], timeout=120)


def steps_logged(path: Path) -> list[dict]:
    """The records of a metrics.jsonl written so far ([] before the file exists)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def shard_offsets(store, shard: dict) -> list:
    """[key, start, end) of every sample of a manifest's shard entry: from its index file (manifest v2)."""
    return json.loads(store.read(shard["index"]))["offsets"] if "index" in shard else shard["offsets"]
