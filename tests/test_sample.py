"""`python -m trainer.sample`: checkpoint -> videos on disk; image-to-video keeps the given first frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.video_io import probe_video, read_video
from tests.conftest import make_cfg
from trainer.sample import main, sample_to_files
from data_pipeline.tokenizer_ckpt import load_tokenizer
from trainer.train_videoar import train_videoar

STAGE = ("curriculum=[{name: s, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 2, micro_batch: 2}]")


@pytest.fixture(scope="module")
def trained(clips_dir, tokenizer_ckpt, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = make_cfg(clips_dir, tokenizer_ckpt, run_dir, STAGE)
    train_videoar(cfg, progress=False)
    return run_dir / "videoar" / "checkpoints"


def test_cli_writes_playable_videos_and_a_contact_sheet(trained, tmp_path, capsys):
    assert main(["--ckpt", str(trained), "--class-id", "0", "--class-id", "3", "--cfg-scale", "2",
                 "--top-p", "0.9", "--out", str(tmp_path)]) == 0
    # 2 latent frames x 3 scales; cond and uncond share each forward
    assert "2 samples of 5 frames (6 transformer forwards, KV cache" in capsys.readouterr().out
    for i in range(2):
        info = probe_video(tmp_path / f"sample-{i:02d}.mp4")
        assert (info.num_frames, info.height, info.width) == (5, 32, 32)
    assert (tmp_path / "samples.png").stat().st_size > 0
    # every video's sidecar says what made it
    meta = json.loads((tmp_path / "sample-01.json").read_text())
    assert meta["class"] == 3 and meta["seed"] == 0 and meta["checkpoint_step"] == 2 and meta["stage"] == "s"
    assert meta["sampling"]["cfg_scale"] == 2.0 and meta["sampling"]["top_p"] == 0.9 and meta["init"] is None
    assert meta["metrics"] is None  # a class id is no synthetic-world caption


def test_cli_errors_are_clear(trained, tmp_path):
    with pytest.raises(SystemExit):
        main(["--ckpt", str(tmp_path / "nothing"), "--class-id", "0"])
    with pytest.raises(SystemExit):
        main(["--ckpt", str(trained), "--prompt", "a class model has no text input"])


def test_image_to_video_starts_from_the_given_frame(trained, clips_dir, tokenizer_ckpt, tmp_path):
    clip = sorted(clips_dir.glob("*.mp4"))[-1]  # a held-out clip
    out = sample_to_files(trained, tmp_path, class_ids=[1], init=clip, init_frames=1, seed=0)
    tok, _, _ = load_tokenizer(tokenizer_ckpt)
    first = torch.as_tensor(read_video(clip, num_frames=1, size=(32, 32))).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    # the causal decoder's first frame depends on the first latent frame only: the given one
    expected = tok.decode_bits(tok.encode_bits(first), batch=1)
    expected = expected.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)[0, 0].numpy()
    assert np.array_equal(out.frames[0, 0], expected)
    assert out.frames.shape == (1, 5, 32, 32, 3)


def test_extend_chains_shots_through_re_encoded_frames(trained, tmp_path, capsys):
    """--extend 3: three shots of the trained length (5 frames, 2 latent frames); each later shot starts from the
    previous shot's last frame re-encoded (--extend-context 1) and adds 4 new frames: 5 + 2 * 4 = 13 frames in
    3 x 6 forwards, with one shot's KV cache. The first shot is the plain sample of the same seed."""
    assert main(["--ckpt", str(trained), "--class-id", "2", "--extend", "3", "--out", str(tmp_path / "x")]) == 0
    printed = capsys.readouterr().out
    assert "1 samples of 13 frames (18 transformer forwards" in printed and "peak memory" in printed
    extended = sample_to_files(trained, tmp_path / "a", class_ids=[2], extend=3)
    plain = sample_to_files(trained, tmp_path / "b", class_ids=[2])
    assert extended.frames.shape == (1, 13, 32, 32, 3) and extended.forwards == 18
    assert np.array_equal(extended.frames[:, :5], plain.frames) and extended.cache_bytes == plain.cache_bytes
    meta = json.loads((tmp_path / "a" / "sample-00.json").read_text())
    assert (meta["frames"], meta["extend"], meta["extend_context"], meta["window"]) == (13, 3, 1, 0)
    with pytest.raises(ValueError, match="--extend-context in 1..1"):
        sample_to_files(trained, tmp_path / "c", class_ids=[2], extend=2, extend_context=2)
