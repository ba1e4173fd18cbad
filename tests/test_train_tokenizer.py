"""Tokenizer training end to end on real clips: it learns, writes openable outputs, and checkpoints load safely."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from data_pipeline.video_io import probe_video
from common.metrics import psnr
from data_pipeline.tokenizer_ckpt import WEIGHTS, load_tokenizer
from trainer.train_tokenizer import eval_batch, train_tokenizer
from data_pipeline.clips import load_clip_folder


@pytest.fixture(scope="module")
def trained(clips_dir, tmp_path_factory):
    from tests.conftest import TINY
    from common.config import load_config

    run = tmp_path_factory.mktemp("tokrun")
    cfg = load_config(None, TINY + [f"data.clips_dir={clips_dir}", f"run.dir={run}", "tokenizer_train.steps=60",
                                    "tokenizer_train.batch_size=4", "tokenizer_train.eval_every=30",
                                    "tokenizer_train.ckpt_every=30", "tokenizer_train.log_every=10"])
    return cfg, train_tokenizer(cfg, progress=False)


def test_short_run_improves_heldout_psnr(trained):
    cfg, run = trained
    assert run.psnr_end > run.psnr_start + 1.0, (
        f"held-out PSNR did not improve enough: step 0 {run.psnr_start:.2f} dB, after "
        f"{cfg.tokenizer_train.steps} steps {run.psnr_end:.2f} dB")
    records = [json.loads(line) for line in (cfg.run_dir / "tokenizer/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40, 50, 60]
    assert [r["heldout_psnr"] for r in records if "heldout_psnr" in r][0] == pytest.approx(run.psnr_start)


def test_outputs_can_be_opened(trained):
    cfg, run = trained
    with Image.open(run.recon_png) as im:
        assert im.size[0] > 32 and im.size[1] >= 4 * 32  # two rows (original, recon) per held-out clip
    assert len(run.recon_videos) == cfg.data.heldout_clips
    for path in run.recon_videos:
        info = probe_video(path)
        assert (info.num_frames, info.height, info.width) == (cfg.data.frames, 32, 64)  # original | recon
    assert (cfg.run_dir / "tokenizer/config.yaml").is_file()


def test_checkpoint_reloads_to_the_same_reconstruction(trained):
    cfg, run = trained
    model, loaded_cfg, step = load_tokenizer(run.checkpoint)
    assert step == cfg.tokenizer_train.steps and loaded_cfg == cfg
    held = load_clip_folder(cfg.data.clips_dir, tuple(cfg.data.resolution), cfg.data.frames, progress=False)[-2:]
    x = eval_batch(held, cfg.data.frames)
    with torch.no_grad():
        assert psnr(model(x).recon, x) == pytest.approx(run.psnr_end, abs=1e-4)


def test_corrupt_or_mismatched_checkpoints_are_rejected_with_the_file_name(trained, tmp_path):
    cfg, run = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((run.checkpoint / "config.json").read_text())
    data = (run.checkpoint / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{bad / WEIGHTS}: not a readable safetensors file"):
        load_tokenizer(bad)
    (bad / WEIGHTS).write_bytes(data)
    other = json.loads((run.checkpoint / "config.json").read_text())
    other["tokenizer"]["base_channels"] = 16
    (bad / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="does not match the model its config builds"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing; is .* a tokenizer checkpoint directory"):
        load_tokenizer(tmp_path)
