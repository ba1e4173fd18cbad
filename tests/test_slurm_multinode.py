"""A two-node SLURM cluster on one machine (jobs/slurm_local.sh start DIR 2: one slurmd per network namespace,
jobs/netns_cluster.sh): a 2-node x 2-process training job submitted through jobs.slurm rendezvous across the
namespace link (gloo), is preempted with USR1, requeues, resumes, and its losses equal a 1-node 4-process run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import save_config
from jobs.slurm import status, submit, write_job
from tests.conftest import local_slurm, make_cfg, steps_logged, wait_for

ROOT = Path(__file__).resolve().parent.parent
STEPS = 120
STAGE = (f"curriculum=[{{name: s, until_step: {STEPS}, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 1, flip_start: 0.2, flip_end: 0.2}]")


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory):
    yield from local_slurm(tmp_path_factory, 2)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_job_preempts_requeues_and_matches_one_node(slurm_two_nodes, clips_dir, tokenizer_ckpt, tmp_path):
    extra = [STAGE, "slurm.nodes=2", "slurm.nproc_per_node=2", "slurm.threads_per_proc=1", "slurm.time=00:30:00",
             "videoar_train.ckpt_every=1000"]
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", *extra)
    script, _ = write_job(cfg)
    job = submit(script)
    metrics = tmp_path / "run" / "videoar" / "metrics.jsonl"
    wait_for(lambda: len(steps_logged(metrics)) >= 3, "the 2-node job to train 3 steps")
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True)
    wait_for(lambda: status(job) == "PENDING", "the job to requeue itself")
    time.sleep(2)  # slurmd refuses a relaunch within the second the previous run's credential was revoked
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    wait_for(lambda: status(job) in ("COMPLETED", "FAILED", "CANCELLED"), "the job to finish")
    log = next((tmp_path / "run" / "slurm").glob("*.out")).read_text()
    assert status(job) == "COMPLETED", log[-3000:]
    assert "preempted: checkpoint written, requeueing" in log and "restart 1" in log
    assert "on node[1-2]" in log or "on node1,node2" in log  # the allocation spans both nodes
    records = steps_logged(metrics)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step once across the requeue
    meta = json.loads(next((tmp_path / "run" / "videoar" / "checkpoints").glob("step-*/metadata.json")).read_text())
    assert meta["world_size"] == 4 and meta["layout"]["dp"] == 4

    ref = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "ref", *extra)
    save_config(ref, tmp_path / "ref.yaml")
    done = subprocess.run([sys.executable, "-m", "jobs.launch", "--nproc", "4", "--threads", "1", "--",
                           "--config", str(tmp_path / "ref.yaml")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    want = [r["loss"] for r in steps_logged(tmp_path / "ref" / "videoar" / "metrics.jsonl")]
    assert [r["loss"] for r in records] == pytest.approx(want, rel=1e-6)
