"""A two-node Ray cluster on one machine: two network namespaces joined by a private bridge
(`jobs/netns_cluster.sh`), a Ray head in one and a worker node in the other, each with its own address; every
connection stays inside those namespaces. The preprocessing job places its encoder actors on both nodes, and a
2-worker Ray Train run puts one training rank on each node (gloo across the namespace link)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.config import save_config
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parent.parent
STAGE = ("curriculum=[{name: s, until_step: 3, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 2}]")


def in_node(ns: str, args: list[str], env: dict, **kw):
    return subprocess.run(["ip", "netns", "exec", ns, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          **kw)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(nodes [(name, netns, ip)], env for Ray clients); the cluster and both Ray nodes stopped by PID after."""
    state = tmp_path_factory.mktemp("netns")
    started = subprocess.run(["bash", str(ROOT / "jobs/netns_cluster.sh"), "start", str(state), "2"],
                             capture_output=True, text=True)
    if started.returncode:
        pytest.skip(f"cannot create network namespaces here ({started.stderr.strip()[-200:]}): needs CAP_NET_ADMIN")
    nodes = [line.split() for line in started.stdout.splitlines()]
    head_ip = nodes[0][2]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": f"{head_ip}:6379", "PYTHONPATH": str(ROOT)}
    ray_bin = str(Path(sys.executable).parent / "ray")
    procs, temps = [], []
    try:
        for i, (_, ns, ip) in enumerate(nodes):
            temps.append(tempfile.mkdtemp(prefix=f"rn{i}", dir="/tmp"))
            role = ["--head", "--port=6379", "--include-dashboard=false"] if i == 0 else [f"--address={head_ip}:6379"]
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, ray_bin, "start", "--block", *role,
                                           f"--node-ip-address={ip}", f"--temp-dir={temps[-1]}", "--num-cpus=2"],
                                          env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            time.sleep(3 if i == 0 else 0)
        probe = [sys.executable, "-c", "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"]
        deadline = time.time() + 240
        while (out := in_node(nodes[0][1], probe, env)).stdout.strip().splitlines()[-1:] != ["2"]:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the 2-node Ray cluster did not come up: {out.stdout[-500:]} {out.stderr[-800:]}")
            time.sleep(2)
        yield nodes, env
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=15)  # Ray shuts down slowly (30-60 s); the group is killed after
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)
        subprocess.run(["bash", str(ROOT / "jobs/netns_cluster.sh"), "stop", str(state)], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_preprocessing_and_ray_train_span_both_nodes(two_nodes, clips_dir, tokenizer_ckpt, tmp_path):
    nodes, env = two_nodes
    head_ns, ips = nodes[0][1], {ip for _, _, ip in nodes}
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, p in enumerate(sorted(clips_dir.glob("*.mp4"))[:6]):
        shutil.copy(p, inputs / p.name)
        meta = json.loads(p.with_suffix(".json").read_text())
        (inputs / p.with_suffix(".json").name).write_text(json.dumps({"caption": meta["caption"], "class": i}))
    shards = tmp_path / "shards"
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, f"preprocess.input={inputs}",
                   f"preprocess.output={shards}", "preprocess.workers=2", f"preprocess.ray_address={nodes[0][2]}:6379",
                   f"data.shards={shards}", "run.threads=1")
    save_config(cfg, tmp_path / "cfg.yaml")
    pre = in_node(head_ns, [sys.executable, "-m", "data_pipeline.preprocess", "--config", str(tmp_path / "cfg.yaml")],
                  env, timeout=600)
    assert pre.returncode == 0, pre.stdout[-2000:] + pre.stderr[-3000:]
    assert f"encoders on 2 node(s): {', '.join(sorted(ips))}" in pre.stdout
    assert json.loads((shards / "manifest.json").read_text())["buckets"]["32x32x5"]["samples"] == 12

    train = in_node(head_ns, [sys.executable, "-m", "jobs.ray_train", "--workers", "2", "--placement",
                              "STRICT_SPREAD", "--config", str(tmp_path / "cfg.yaml")], env, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    done = [line for line in (train.stdout + train.stderr).splitlines() if "ray train worker done" in line]
    assert {line.split(" on node ")[1].split(",")[0] for line in done} == ips, done
    meta = json.loads((tmp_path / "run" / "videoar" / "checkpoints" / "step-00000003" / "metadata.json").read_text())
    assert meta["step"] == 3 and meta["layout"]["dp"] == 2
