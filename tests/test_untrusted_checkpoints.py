"""Crafted files run no code: a checkpoint shard, the DCP files of a checkpoint (resume and consolidation), a
consolidated file and a shard sample, each carrying a pickle payload that would create a file if executed, are
refused with an error naming the file, and the file never appears."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from parallel.digests import bytes_digest
from parallel.launch import run_local
from tests.conftest import make_cfg

STAGE = ("curriculum=[{name: s, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 2, micro_batch: 1}]")


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file is the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_bytes(marker: Path, **extra) -> bytes:
    buf = io.BytesIO()
    torch.save({"state": Payload(marker), **extra}, buf)
    return buf.getvalue()


def replace_in_checkpoint(step_dir: Path, rel: str, data: bytes) -> None:
    """Overwrite one file of a committed checkpoint and its digest in metadata.json (the attacker controls the
    directory), so the payload gets past the checksum and reaches the loader."""
    (step_dir / rel).write_bytes(data)
    meta = json.loads((step_dir / "metadata.json").read_text())
    assert rel in meta["shards"]
    meta["shards"][rel] = bytes_digest(data, meta.get("digest", "sha256"))
    (step_dir / "metadata.json").write_text(json.dumps(meta))


def _zero1_train(rank, world, clips_dir, tokenizer_ckpt, run_dir, out):
    from parallel.safe_load import WeightsOnlyCheckpointEngine
    from trainer.train_videoar import VideoARTrainer

    cfg = make_cfg(clips_dir, tokenizer_ckpt, run_dir, STAGE, "parallel.zero_stage=1")
    trainer = VideoARTrainer(cfg, progress=False)
    error = ""
    try:
        trainer.train()
    except (ValueError, RuntimeError) as e:  # the crafted resume: the reading rank refuses, the other loses it
        error = f"{type(e).__name__}: {e}"
    is_safe = isinstance(trainer.engine.engine.checkpoint_engine, WeightsOnlyCheckpointEngine)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"error": error, "safe_engine": is_safe,
                                                            "step": trainer.step}))


@pytest.fixture(scope="module")
def zero1_run(clips_dir, tokenizer_ckpt, tmp_path_factory):
    """A 2-rank DeepSpeed ZeRO-1 run of 2 steps with its committed checkpoint."""
    root = tmp_path_factory.mktemp("zero1")
    run_local(2, _zero1_train, clips_dir, tokenizer_ckpt, root / "run", root)
    return root


def pickle_payload(marker: Path) -> bytes:
    """A plain pickle (no torch.save container) whose loading creates `marker`."""
    return pickle.dumps(Payload(marker))


@pytest.mark.slow
@pytest.mark.parametrize("target", [".metadata", "__0_0.distcp"])
def test_dcp_files_with_a_payload_are_refused_on_resume_and_consolidation(target, zero1_run, clips_dir,
                                                                          tokenizer_ckpt, tmp_path):
    """A ZeRO-1 run writes its tensors as DCP (`dcp/`): DCP's own reader would `pickle.load` the `.metadata`
    and would unpickle tensor items without `weights_only` if it ever did. A crafted `.metadata` (plain pickle)
    and a crafted data file (torch.save of an object) are refused by consolidation and by a resume on both
    ranks, naming the file, and the payload never runs."""
    import shutil

    from parallel.checkpoint_format import full_model_state
    from parallel.dcp_format import chunk_digests

    reports = [json.loads((zero1_run / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["safe_engine"] and r["step"] == 2 and not r["error"] for r in reports)
    run = tmp_path / "run"
    shutil.copytree(zero1_run / "run", run)
    step_dir = run / "videoar" / "checkpoints" / "step-00000002"
    meta, model = full_model_state(step_dir)  # the genuine checkpoint consolidates
    assert model and all(isinstance(v, torch.Tensor) for v in model.values())

    marker = tmp_path / "pwned"
    rel = f"dcp/{target}"
    data = pickle_payload(marker) if target == ".metadata" else payload_bytes(marker)
    if target != ".metadata":  # the same length as the genuine file, so every item's byte range holds payload
        size = (step_dir / rel).stat().st_size
        data = (data * (size // len(data) + 1))[:size]
    replace_in_checkpoint(step_dir, rel, data)
    if target != ".metadata":  # the attacker rewrites the chunks' checksums too, so the bytes reach torch.load
        meta = json.loads((step_dir / "metadata.json").read_text())
        meta["items"][rel] = chunk_digests(step_dir / "dcp", [step_dir / rel])[target][1]
        (step_dir / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="refused|dcp"):
        full_model_state(step_dir)
    assert not marker.exists()
    run_local(2, _zero1_train, clips_dir, tokenizer_ckpt, run, tmp_path)
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in range(2)]
    assert all("dcp" in e for e in errors), errors
    assert not marker.exists()


def test_a_checkpoint_shard_with_a_payload_is_refused(tmp_path):
    from parallel.checkpoint_format import read_checkpoint, save_checkpoint, step_dir

    save_checkpoint(tmp_path, 1, {"rank-00000.pt": {"w": torch.ones(2)}}, {"note": "x"})
    marker = tmp_path / "pwned"
    replace_in_checkpoint(step_dir(tmp_path, 1), "rank-00000.pt", payload_bytes(marker))
    with pytest.raises(ValueError, match="rank-00000.pt: refused"):
        read_checkpoint(step_dir(tmp_path, 1))
    assert not marker.exists()


def test_a_consolidated_file_with_a_payload_is_refused(tmp_path):
    """Consolidated weights are a safetensors file: a pickle under that name is not even parsed as one."""
    from parallel.checkpoint_format import read_consolidated

    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload_bytes(marker))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_consolidated(path)
    assert not marker.exists()


def test_a_shard_sample_with_a_pickled_array_is_refused(tmp_path):
    """A sample's .npy members are read with allow_pickle=False: an object array (a pickle inside) is refused."""
    from data_pipeline.shards import decode_members

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("sample.latent.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_members(tar_path.read_bytes())
    assert not marker.exists()
