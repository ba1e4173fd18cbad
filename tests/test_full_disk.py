"""A full disk during a checkpoint save or a shard write (a real tmpfs that fills up mid-write): a clear error
naming the path, the previous committed checkpoint / the committed shards intact and resumable, nothing partial
visible as committed, and a rerun after freeing space continues exactly."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
from pathlib import Path

import pytest

from data_pipeline.object_store import open_store

from parallel.checkpoint_format import committed_steps
from tests.conftest import make_cfg, shard_offsets

STAGE = ("curriculum=[{name: s, until_step: 6, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 2, micro_batch: 1, flip_start: 0.1, flip_end: 0.2}]")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at `path` (root in the container: CI's machine is like this one)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs CAP_SYS_ADMIN")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_resumes_exactly(clips_dir, tokenizer_ckpt, tmp_path):
    from trainer.checkpointing import CheckpointWriteError
    from trainer.train_videoar import VideoARTrainer

    def cfg(run_dir):
        return make_cfg(clips_dir, tokenizer_ckpt, run_dir, STAGE, "videoar_train.ckpt_every=2")

    ref = VideoARTrainer(cfg(tmp_path / "ref"), progress=False).train().losses
    one = dir_bytes(tmp_path / "ref" / "videoar" / "checkpoints" / "step-00000006")
    ckpts = tmp_path / "run" / "videoar" / "checkpoints"
    with small_tmpfs(ckpts, (int(one * 1.5) // 4096 + 1) * 4096) as resize:  # room for one checkpoint, not two
        with pytest.raises(CheckpointWriteError) as err:
            VideoARTrainer(cfg(tmp_path / "run"), progress=False).train()
        message = str(err.value)
        assert "step 4" in message and str(ckpts) in message and "No space left on device" in message
        assert f"[Errno {errno.ENOSPC}]" in message and "step-00000002" in message
        assert committed_steps(ckpts) == [2] and (ckpts / "latest").read_text().strip() == "step-00000002"
        assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]  # the partial step is gone
        resize(64 << 20)  # space freed: the rerun resumes from step 2 and ends where the uninterrupted run did
        run = VideoARTrainer(cfg(tmp_path / "run"), progress=False).train()
        assert run.start_step == 2 and run.losses == pytest.approx(ref[2:], rel=1e-6)
        assert committed_steps(ckpts) == [2, 4, 6]


def test_a_full_disk_during_a_shard_write_names_it_and_keeps_what_was_written(tmp_path):
    from data_pipeline.object_store import LocalStore

    root = tmp_path / "shards"
    with small_tmpfs(root, 64 << 10):
        store = LocalStore(root)
        first = bytes(range(256)) * 80  # 20 KiB
        store.write("32x32x5/shard-000000.tar", first)
        with pytest.raises(OSError) as err:
            store.write("32x32x5/shard-000001.tar", b"x" * (100 << 10))
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(root / "32x32x5/shard-000001.tar")
        assert (root / "32x32x5/shard-000000.tar").read_bytes() == first
        assert sorted(p.name for p in (root / "32x32x5").iterdir()) == ["shard-000000.tar"]  # no partial file


@pytest.mark.slow
def test_preprocessing_onto_a_full_disk_fails_clearly_and_a_rerun_completes_exactly_once(clips_dir, tokenizer_ckpt,
                                                                                        tmp_path):
    """The Ray job writing shards onto a disk that fills up stops with the path in the error; committed inputs
    stay committed, no manifest claims more than was written, and the rerun after freeing space writes every
    sample exactly once (the same samples as a run on a roomy disk)."""
    from data_pipeline.preprocess import preprocess

    def cfg(out):
        return make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "run", STAGE, f"preprocess.input={clips_dir}",
                        f"preprocess.output={out}", "preprocess.workers=1", "preprocess.shard_bytes=4000")

    preprocess(cfg(tmp_path / "roomy"), progress=False)
    want = json.loads((tmp_path / "roomy" / "manifest.json").read_text())["buckets"]["32x32x5"]
    out = tmp_path / "small"
    with small_tmpfs(out, (dir_bytes(tmp_path / "roomy") // 2 // 4096) * 4096) as resize:
        with pytest.raises(OSError) as err:
            preprocess(cfg(out), progress=False)
        assert err.value.errno == errno.ENOSPC and str(out) in str(err.value)
        assert not (out / "manifest.json").exists()
        resize(64 << 20)
        preprocess(cfg(out), progress=False)
        got = json.loads((out / "manifest.json").read_text())["buckets"]["32x32x5"]
        keys = [k for s in got["shards"] for k, _, _ in shard_offsets(open_store(out), s)]
        assert got["samples"] == want["samples"] == len(keys) == len(set(keys))
        assert sorted(keys) == sorted(k for s in want["shards"]
                                     for k, _, _ in shard_offsets(open_store(tmp_path / "roomy"), s))
