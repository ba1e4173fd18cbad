"""`python -m jobs.launch`: N local processes with the torchrun environment, signals forwarded, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import make_cfg
from common.config import save_config
from trainer.preemption import EXIT_PREEMPTED

STAGE = ("curriculum=[{name: s, until_step: 40, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 2}]")


@pytest.mark.slow
def test_two_processes_train_get_preempted_and_resume(clips_dir, tokenizer_ckpt, tmp_path):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, "videoar_train.ckpt_every=1000")
    save_config(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "jobs.launch", "--nproc", "2", "--threads", "1",
           "--master-port", str(29500 + os.getpid() % 1000), "--", "--config", str(tmp_path / "cfg.yaml")]
    proc = subprocess.Popen(cmd, start_new_session=True)
    metrics = tmp_path / "run" / "videoar" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # training is under way
        assert proc.poll() is None and time.time() < deadline, "launch ended or stalled before step 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # what SLURM's --signal does to the launcher
    assert proc.wait(timeout=300) == EXIT_PREEMPTED
    ckpts = sorted((tmp_path / "run" / "videoar" / "checkpoints").glob("step-*"))
    stopped = int(ckpts[-1].name[5:])
    assert 2 <= stopped < 40
    assert subprocess.run(cmd, timeout=600).returncode == 0  # the rerun resumes and finishes
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))  # every step once, resumed after the preemption
    shard = torch.load(tmp_path / "run" / "videoar" / "checkpoints" / "step-00000040" / "rank-00001.pt",
                       weights_only=True)
    assert shard["step"] == 40


def test_a_preemption_during_start_up_is_kept_not_fatal():
    """SIGUSR1 reaches the launcher while its rank is still starting (no handler yet): the rank ignores it until
    its handler is installed, the launcher passes it on again, and the rank exits for requeue (not killed)."""
    cmd = [sys.executable, "-m", "jobs.launch", "--nproc", "1", "--module", "tests.slow_start_rank", "--", "3"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    time.sleep(1.0)  # the launcher has started its rank, which is still in its 3 s start-up
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
