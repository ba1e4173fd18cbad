"""Preemption: a signal mid-run -> all ranks stop after the same step, checkpoint, exit with EXIT_PREEMPTED;
the rerun resumes and finishes with losses equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from jobs.demo import train_with_preemption
from parallel.checkpoint_format import committed_steps
from parallel.launch import run_local
from tests.conftest import make_cfg
from common.config import save_config
from common.metrics import read_jsonl
from trainer.preemption import EXIT_PREEMPTED
from trainer.train_videoar import VideoARTrainer, main

STAGE = ("curriculum=[{name: s, until_step: 5, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 1, flip_start: 0.2, flip_end: 0.2}]")


def signal_after(trainer: VideoARTrainer, step: int, rank_to_signal: int, rank: int) -> None:
    """Send SIGUSR1 to this process right after `step` completes (deterministic stand-in for a scheduler)."""
    original = trainer.train_step

    def step_then_signal():
        rec = original()
        if trainer.step == step and rank == rank_to_signal:
            os.kill(os.getpid(), signal.SIGUSR1)
        return rec
    trainer.train_step = step_then_signal


def test_signal_checkpoints_and_exits_for_requeue(clips_dir, tokenizer_ckpt, tmp_path, monkeypatch):
    ref = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "ref", STAGE), progress=False).train().losses
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE)
    trainer = VideoARTrainer(cfg, progress=False)
    signal_after(trainer, 2, 0, 0)
    first = trainer.train()
    assert first.preempted and first.step == 2 and first.checkpoint.name == "step-00000002"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGUSR1))
    second = VideoARTrainer(cfg, progress=False).train()
    assert not second.preempted and second.start_step == 2
    assert first.losses + second.losses == ref
    # the CLI turns a preemption into the requeue exit code
    save_config(cfg, tmp_path / "cfg.yaml")
    monkeypatch.setattr(VideoARTrainer, "train", lambda self, max_steps=None, **kw: type(first)(0, 1, preempted=True))
    assert main(["--config", str(tmp_path / "cfg.yaml")]) == EXIT_PREEMPTED


def _preempted_worker(rank, world, clips_dir, tokenizer_ckpt, run_dir, out):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, run_dir, STAGE)
    trainer = VideoARTrainer(cfg, progress=False)
    signal_after(trainer, 2, 1, rank)  # only rank 1 is signalled
    first = trainer.train()
    second = VideoARTrainer(cfg, progress=False).train()
    torch.save({"first": first.losses, "preempted": first.preempted, "step": first.step,
                "second": second.losses}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_ranks_agree_to_stop_when_one_is_signalled(clips_dir, tokenizer_ckpt, tmp_path):
    ref = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "ref", STAGE), progress=False).train().losses
    run_local(2, _preempted_worker, clips_dir, tokenizer_ckpt, tmp_path / "run", tmp_path)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["preempted"] and got["step"] == 2
        assert got["first"] + got["second"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.slow
def test_demo_preempt_at_zero_does_not_preempt(clips_dir, tokenizer_ckpt, tmp_path):
    """`python -m jobs.demo --preempt-at 0` trains straight through on its two launched processes: no SIGUSR1 (it
    was sent at the first logged step, since every step is >= 0), one committed checkpoint, the last."""
    steps = 40  # long enough (a few seconds) for the launcher's 0.5 s poll to see logged steps
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE.replace("until_step: 5", f"until_step: {steps}"),
                   "videoar_train.ckpt_every=1000", "parallel.timeout_s=60")
    stopped, _ = train_with_preemption(cfg, 0)
    assert stopped == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "videoar" / "metrics.jsonl") if "loss" in r] == \
        list(range(1, steps + 1))  # each step once: no redone steps after a resume
    assert committed_steps(tmp_path / "run" / "videoar" / "checkpoints") == [steps]
