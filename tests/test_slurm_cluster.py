"""A real single-node SLURM cluster (installed and started by jobs/slurm_local.sh, inside a network namespace): a training job submitted
through jobs.slurm runs 2 processes, is signalled mid-run, checkpoints, requeues itself, resumes, and finishes
the planned steps with losses equal to an uninterrupted run's."""

from __future__ import annotations

import subprocess
import time

import pytest

from jobs.slurm import status, submit, write_job
from tests.conftest import local_slurm, make_cfg, steps_logged, wait_for
from trainer.train_videoar import VideoARTrainer

# long enough that the job cannot finish before the test's signal arrives (the tiny model runs ~12 steps/s: 30
# steps once finished in 2.5 s, before the USR1, and the job then never requeued)
STEPS = 200
STAGE = (f"curriculum=[{{name: s, until_step: {STEPS}, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 2, flip_start: 0.2, flip_end: 0.2}]")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    yield from local_slurm(tmp_path_factory, 1)


@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_matches(slurm_cluster, clips_dir, tokenizer_ckpt, tmp_path):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, "slurm.nproc_per_node=2",
                   "slurm.threads_per_proc=1", "slurm.time=00:30:00", "videoar_train.ckpt_every=1000")
    script, _ = write_job(cfg)
    job = submit(script)
    metrics = tmp_path / "run" / "videoar" / "metrics.jsonl"
    wait_for(lambda: len(steps_logged(metrics)) >= 3, "the job to train 3 steps")
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True)  # what --signal does before the limit
    wait_for(lambda: status(job) == "PENDING", "the job to requeue itself")
    # release it early (SLURM holds a requeued job on its BeginTime); slurmd refuses a relaunch within the second
    # its previous run was revoked ("Job credential revoked"), which the BeginTime delay normally covers
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    wait_for(lambda: status(job) in ("COMPLETED", "FAILED", "CANCELLED"), "the job to finish")
    assert status(job) == "COMPLETED"
    log = next((tmp_path / "run" / "slurm").glob("*.out")).read_text()
    assert "preempted: checkpoint written, requeueing" in log and "restart 1" in log
    records = steps_logged(metrics)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # every step once across the requeue
    reference = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "ref", STAGE), progress=False).train()
    assert [r["loss"] for r in records] == pytest.approx(reference.losses, rel=1e-5)
