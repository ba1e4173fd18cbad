"""Nothing the embedded defaults start listens beyond loopback: the listening sockets of the preprocessing job's
process tree (its local Ray runtime: GCS, raylet, workers, agents) and of a 2-process training run (rendezvous
store, gloo, the Prometheus endpoint), sampled every 0.2 s while they run (psutil), are all on 127.0.0.1 / ::1
(or IPv4-mapped 127.0.0.1)."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.config import save_config
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parent.parent
STAGE = ("curriculum=[{name: s, until_step: 30, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 2, micro_batch: 1}]")


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def listening_while_running(args: list[str], timeout: float = 600) -> dict[tuple[str, str, int], str]:
    """(process name, ip, port) -> command of every listening TCP/UDP socket of the command's process tree,
    polled until it exits (it must exit 0)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: dict[tuple[str, str, int], str] = {}
    deadline = time.time() + timeout
    root = psutil.Process(proc.pid)
    while proc.poll() is None and time.time() < deadline:
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                        seen[(p.name(), c.laddr.ip, c.laddr.port)] = " ".join(p.cmdline())[:200]
            except psutil.Error:  # exited between the listing and the look
                continue
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    return seen


@pytest.mark.slow
def test_preprocessing_and_training_listen_on_loopback_only(clips_dir, tokenizer_ckpt, tmp_path):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, f"preprocess.input={clips_dir}",
                   f"preprocess.output={tmp_path / 'shards'}", "preprocess.workers=1", "run.metrics_port=0")
    config = tmp_path / "config.yaml"
    save_config(cfg, config)
    ray_side = listening_while_running(["data_pipeline.preprocess", "--config", str(config)])
    names = {name for name, _, _ in ray_side}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's servers were seen (the sampling saw the runtime)
    train_side = listening_while_running(["jobs.launch", "--nproc", "2", "--module", "trainer.train_videoar", "--",
                                          "--config", str(config)])
    assert len(train_side) >= 3, train_side  # rendezvous store, gloo pairs, the metrics endpoint at least
    exposed = {k: v for k, v in {**ray_side, **train_side}.items() if not is_loopback(k[1])}
    assert exposed == {}
