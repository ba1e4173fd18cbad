"""Failures the trainer survives (issue 7): non-finite steps, a corrupted newest checkpoint, asynchronous saves,
and a hung rank. (The kill -9 chaos test is tests/test_chaos.py; object-store outages tests/test_s3_faults.py.)"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

import pytest
import torch

from parallel.launch import run_local
from tests.conftest import make_cfg
from parallel.checkpoint_format import committed_steps, read_checkpoint, step_dir
from parallel.dcp_format import read_all
from parallel.digests import ITEMS_DIGEST, items_digest
from common.metrics import read_jsonl
from parallel.engine import poison_if_nonfinite
from trainer.checkpointing import AsyncSaver
from trainer.train_videoar import NonFiniteError, VideoARTrainer

PEAK = "run.peak_flops=1e9"  # skip the start-up GEMM measurement


def poison_gradients(trainer: VideoARTrainer, bad_steps: set[int]) -> None:
    """NaN gradients (through a backward hook on the head) while `trainer.step` is in `bad_steps`."""
    trainer.model.head.weight.register_hook(lambda g: g * float("nan") if trainer.step in bad_steps else g)


def weights(trainer: VideoARTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_a_non_finite_step_is_skipped_and_counted(clips_dir, tokenizer_ckpt, tmp_path):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, "videoar_train.steps=5", PEAK)
    trainer = VideoARTrainer(cfg, progress=False)
    poison_gradients(trainer, {2})  # the third step
    trainer.train(max_steps=2)
    before, lr_steps = weights(trainer), trainer.engine.sched.last_epoch
    trainer.train(max_steps=3)
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update
    assert trainer.engine.sched.last_epoch == lr_steps  # the LR schedule did not advance
    assert trainer.skipped_steps == 1
    run = trainer.train()
    assert run.step == 5 and all(torch.isfinite(torch.tensor(run.losses)))
    records = {r["step"]: r for r in read_jsonl(tmp_path / "videoar" / "metrics.jsonl")}
    assert [records[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert records[3]["grad_norm"] != records[3]["grad_norm"]  # NaN, logged as such


def test_an_inf_loss_with_finite_gradients_is_skipped_too(clips_dir, tokenizer_ckpt, tmp_path, monkeypatch):
    """An inf constant added to the third step's loss leaves its gradients finite; the step is skipped all the same
    (the loss is logged as inf)."""
    import models.objective

    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, "videoar_train.steps=4", PEAK)
    trainer = VideoARTrainer(cfg, progress=False)
    real = models.objective.bit_loss

    def inf_at_third_step(logits, targets, weights=None):
        loss, token_loss, token_correct = real(logits, targets, weights)
        return (loss + float("inf") if trainer.step == 2 else loss), token_loss, token_correct

    monkeypatch.setattr(models.objective, "bit_loss", inf_at_third_step)
    trainer.train(max_steps=2)
    before = weights(trainer)
    trainer.train(max_steps=3)
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.skipped_steps == 1
    trainer.train()
    records = {r["step"]: r for r in read_jsonl(tmp_path / "videoar" / "metrics.jsonl")}
    assert records[3]["loss"] == float("inf") and records[4]["skipped_steps"] == 1
    assert records[4]["loss"] < float("inf")


def test_poison_if_nonfinite_keeps_finite_gradients_bit_identical():
    w = torch.randn(5, requires_grad=True)
    for extra, finite in ((0.0, True), (float("inf"), False), (float("nan"), False)):
        w.grad = None
        plain = torch.autograd.grad((w * w).sum() + extra, w)[0]
        (poison_if_nonfinite((w * w).sum() + extra)).backward()
        assert torch.isfinite(plain).all()  # the constant does not reach the gradients...
        assert torch.equal(w.grad, plain) if finite else torch.isnan(w.grad).all()  # ...the poison does


def test_k_non_finite_steps_in_a_row_stop_with_a_checkpoint_of_the_last_good_state(clips_dir, tokenizer_ckpt,
                                                                                   tmp_path):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, "videoar_train.steps=8", "videoar_train.max_nonfinite_steps=3",
                   PEAK)
    trainer = VideoARTrainer(cfg, progress=False)
    poison_gradients(trainer, set(range(2, 8)))
    trainer.train(max_steps=2)
    good = weights(trainer)
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(3\.\.5\).*max_nonfinite_steps=3.*"
                                             r"step-00000005 holds the last good weights \(unchanged since step 2\)"):
        trainer.train()
    assert trainer.skipped_steps == 3 and committed_steps(tmp_path / "videoar" / "checkpoints")[-1] == 5
    meta, shards = read_checkpoint(step_dir(tmp_path / "videoar" / "checkpoints", 5))
    saved = shards["rank-00000.pt"]
    assert saved["skipped_steps"] == 3
    model = read_all(step_dir(tmp_path / "videoar" / "checkpoints", 5), meta["items"], "model/")
    assert all(torch.equal(model[f"model/{k}"], good[k]) for k in good)
    d = step_dir(tmp_path / "videoar" / "checkpoints", 5)  # each data file's digest named and derived from its chunks'
    assert meta["items_digest"] == ITEMS_DIGEST and meta["items"] and all(
        meta["shards"][f] == items_digest((d / f).stat().st_size, chunks) for f, chunks in meta["items"].items())
    assert read_jsonl(tmp_path / "videoar" / "metrics.jsonl")[-1]["skipped_steps"] == 3


@pytest.mark.parametrize("name", ["rank-00000.pt", "dcp/__0_0.distcp"])
def test_a_truncated_file_of_the_newest_checkpoint_falls_back_to_the_previous_one(name, clips_dir, tokenizer_ckpt,
                                                                                  tmp_path, caplog):
    """The rank's small shard (verified whole) or its DCP data file (verified chunk by chunk as it is read)."""
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, "videoar_train.steps=4", "videoar_train.ckpt_every=2", PEAK)
    ref = VideoARTrainer(cfg, progress=False).train()
    root = tmp_path / "videoar" / "checkpoints"
    assert committed_steps(root) == [2, 4]
    shard = step_dir(root, 4) / name
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    resumed = VideoARTrainer(cfg, progress=False)
    with caplog.at_level(logging.WARNING):
        run = resumed.train()
    assert run.start_step == 2
    why = ("checksum mismatch" if name.endswith(".pt") else "bytes \\d+\\+\\d+ do not match their checksum")
    assert re.search(f"checkpoint step 4 is unusable: {re.escape(str(shard))}: {why} \\(corrupted or partially "
                     "written\\); falling back to step 2", caplog.text), caplog.text
    assert run.losses == ref.losses[2:]  # exact: the resumed run redoes steps 3 and 4


def test_async_save_commits_what_a_synchronous_save_commits(clips_dir, tokenizer_ckpt, tmp_path):
    shards = {}
    for mode in ("false", "true"):
        cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / mode, "videoar_train.steps=5",
                       "videoar_train.ckpt_every=2", f"videoar_train.async_save={mode}", PEAK)
        run = VideoARTrainer(cfg, progress=False).train()
        root = tmp_path / mode / "videoar" / "checkpoints"
        assert committed_steps(root) == [2, 4, 5] and run.checkpoint == step_dir(root, 5)
        for s in (2, 4, 5):
            meta, read = read_checkpoint(step_dir(root, s))
            shards[mode, s] = read["rank-00000.pt"], read_all(step_dir(root, s), meta["items"])
    for s in (2, 4, 5):
        (sync, sync_tensors), (asyn, asyn_tensors) = shards["false", s], shards["true", s]
        assert sync["step"] == asyn["step"] == s
        assert set(sync_tensors) == set(asyn_tensors) and any(k.endswith("/exp_avg_sq") for k in sync_tensors)
        for name, value in sync_tensors.items():  # weights, AdamW moments and steps
            assert torch.equal(value, asyn_tensors[name]), (s, name)


def _hang_rank_one(rank: int, world: int, clips_dir, tokenizer_ckpt, run_dir, report) -> None:
    cfg = make_cfg(clips_dir, tokenizer_ckpt, run_dir, "parallel.timeout_s=3", PEAK,
                   "curriculum=[{name: main, until_step: 4, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
                   "global_batch: 4, micro_batch: 2}]")
    trainer = VideoARTrainer(cfg, progress=False)
    step = trainer.train_step

    def train_step():
        if rank == 1 and trainer.step == 2:
            time.sleep(8)  # hung: never joins the step's gradient all-reduce in time
        return step()

    trainer.train_step = train_step
    try:
        trainer.train()
        outcome = "finished"
    except RuntimeError as e:
        outcome = str(e)
    (report / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow
def test_a_hung_rank_makes_a_collective_time_out_with_an_error_naming_the_rank(clips_dir, tokenizer_ckpt, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    run_local(2, _hang_rank_one, clips_dir, tokenizer_ckpt, tmp_path / "run", report)
    message = (report / "rank0.txt").read_text()
    assert message.startswith("rank 0 of 2 (tp 0, dp 0, pp 0): a collective failed or waited longer than "
                              "parallel.timeout_s=3 s; another rank has probably died or hung"), message
    assert "Timed out" in message
    assert (report / "rank1.txt").read_text() != "finished"


def _deepspeed_nan_step(rank: int, world: int, clips_dir, tokenizer_ckpt, run_dir, report) -> None:
    cfg = make_cfg(clips_dir, tokenizer_ckpt, run_dir, "parallel.zero_stage=1", PEAK,
                   "curriculum=[{name: main, until_step: 4, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
                   "global_batch: 4, micro_batch: 2}]")
    trainer = VideoARTrainer(cfg, progress=False)
    trainer.model.head.weight.register_hook(lambda g: g * float("nan") if trainer.step == 2 else g)
    trainer.train(max_steps=2)
    before, lr_steps = weights(trainer), trainer.engine.sched.last_epoch
    trainer.train(max_steps=3)
    unchanged = all(torch.equal(before[k], v) for k, v in weights(trainer).items())
    lr_advanced = trainer.engine.sched.last_epoch - lr_steps
    run = trainer.train()
    finite = all(torch.isfinite(torch.tensor(run.losses)))
    (report / f"rank{rank}.txt").write_text(f"{unchanged} {lr_advanced} {trainer.skipped_steps} {finite}")


@pytest.mark.slow
def test_deepspeed_zero_skips_a_non_finite_step_the_same_way(clips_dir, tokenizer_ckpt, tmp_path):
    """ZeRO-1 over 2 ranks: DeepSpeed's own overflow check drops the update and the LR step; the trainer counts
    it. Reported per rank: weights unchanged by the bad step, LR steps during it, skipped steps, later losses
    finite."""
    report = tmp_path / "report"
    report.mkdir()
    run_local(2, _deepspeed_nan_step, clips_dir, tokenizer_ckpt, tmp_path / "run", report)
    for rank in range(2):
        assert (report / f"rank{rank}.txt").read_text() == "True 0 1 True"


def test_a_commit_clears_what_a_dead_save_left_and_keeps_the_last_k(tmp_path):
    from parallel.checkpoint_format import save_checkpoint

    stale = tmp_path / ".tmp-step-00000003"  # a save killed before its commit
    stale.mkdir()
    (stale / "rank-00000.pt").write_bytes(b"partial")
    for step in (4, 5, 6):
        save_checkpoint(tmp_path, step, {"rank-00000.pt": {"step": torch.tensor(step)}}, {}, keep_last=2)
    assert committed_steps(tmp_path) == [5, 6] and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".trash-")) == \
        ["latest", "step-00000005", "step-00000006"]
    assert (tmp_path / "latest").read_text() == "step-00000006\n"
    assert sorted(p.name for p in (tmp_path / "step-00000006").iterdir()) == ["metadata.json", "rank-00000.pt"]


def test_the_async_writer_runs_at_lower_priority_and_training_keeps_its_own():
    """The background checkpoint writer (and the threads it starts, e.g. the write-behind flusher) run at
    niceness +10 relative to training; the training thread's niceness is unchanged."""
    saver = AsyncSaver()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def niceness() -> tuple[int, int]:
        seen = []
        child = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS,
                                                                           threading.get_native_id())))
        child.start()
        child.join()
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), seen[0]

    saver.submit(niceness)
    assert saver.wait() == (min(19, base + 10),) * 2
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
