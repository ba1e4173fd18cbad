"""Quality metrics of issue 15 on known inputs and real files: FVD through a user-supplied TorchScript extractor,
the tokenizer's per-scale report and object colour error, and the VideoAR quality evaluation (caption scores at
stage ends inside training; image-to-video drift beyond the trained length from the CLI)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.metrics import psnr, read_jsonl
from data_pipeline import synth
from data_pipeline.clips import to_model_input, to_uint8_frames
from data_pipeline.tokenizer_ckpt import load_tokenizer
from data_pipeline.video_io import read_video
from tests.conftest import make_cfg
from trainer.evaluate_videos import main as evaluate_main
from trainer.tokenizer_eval import object_color_error, tokenizer_quality
from trainer.train_videoar import train_videoar
from trainer.video_metrics import caption_scores, frechet_distance, mean_scores, video_features


class MeanStdFeatures(torch.nn.Module):
    """A stand-in for a video network: per-channel mean and std over (T, H, W), 6 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)


def test_fvd_uses_the_torchscript_extractor(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth.generate_clips(a, 8, frames=5, size=32, seed=0, progress=False, world="easy")
    synth.generate_clips(b, 8, frames=5, size=32, seed=7, progress=False, world="full")
    scripted = torch.jit.script(MeanStdFeatures())
    scripted.save(str(tmp_path / "features.pt"))
    out = tmp_path / "scores.json"
    assert evaluate_main(["--samples", str(a), "--fvd-extractor", str(tmp_path / "features.pt"), "--reference",
                          str(b), "--json", str(out)]) == 0
    videos = lambda d: [read_video(p) for p in sorted(d.glob("*.mp4"))]  # noqa: E731
    module = MeanStdFeatures()
    expected = frechet_distance(video_features(module, videos(a)), video_features(module, videos(b)))
    got = json.loads(out.read_text())["fvd"]
    assert got == pytest.approx(expected, rel=1e-9) and got > 0.01  # different worlds are far apart
    assert evaluate_main(["--samples", str(a), "--fvd-extractor", str(tmp_path / "features.pt"), "--reference",
                          str(a), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["fvd"] == pytest.approx(0.0, abs=1e-9)
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(SystemExit):
        evaluate_main(["--samples", str(a), "--fvd-extractor", str(tmp_path / "junk.pt"), "--reference", str(b)])


def test_object_color_error_on_known_frames():
    scene = synth.sample_clip(np.random.default_rng([0, 0]), 32, 32, "easy")
    frames = synth.render_clip(scene, 3, 32, 32)
    caption = synth.caption_for(scene)
    assert object_color_error(frames, frames, caption) == 0.0
    shifted = frames.astype(np.int16)
    shifted[..., 0] += 30  # every red value 30 higher (no object colour saturates at 255 - 30)
    assert object_color_error(frames, np.clip(shifted, 0, 255).astype(np.uint8), caption) == pytest.approx(10.0)
    assert object_color_error(frames, frames, "a cat on a mat") is None


def test_tokenizer_report_by_scales(tiny_cfg, tokenizer_ckpt, clips_dir):
    tok, _, _ = load_tokenizer(tokenizer_ckpt)
    clips = sorted(clips_dir.glob("*.mp4"))[:2]
    x = torch.cat([to_model_input(read_video(p, num_frames=5, size=(32, 32))) for p in clips])
    captions = [json.loads(p.with_suffix(".json").read_text())["caption"] for p in clips]
    q, recon = tokenizer_quality(tok.train(), x, captions)
    assert tok.training  # evaluated in eval mode, then restored
    with torch.no_grad():
        assert q["psnr"] == pytest.approx(psnr(tok.eval()(x).recon, x), abs=1e-6)
    assert [k for k in q if k.startswith("psnr_scales")] == ["psnr_scales1", "psnr_scales2", "psnr_scales3"]
    assert q["psnr_scales3"] == q["psnr"] and q["psnr_scales1"] != q["psnr_scales3"]
    assert len([k for k in q if k.startswith("psnr_frame")]) == 5 and -1 <= q["ssim"] <= 1
    # the reconstructions scored against their captions (the ceiling for sampled videos), as the video metrics do
    ceiling = mean_scores([caption_scores(r, c) for r, c in zip(to_uint8_frames(recon), captions)])
    assert {k: q[f"caption_{k}"] for k in ("color", "shape", "direction", "present_90")} == \
        {k: ceiling[k] for k in ("color", "shape", "direction", "present_90")}
    real = mean_scores([caption_scores(f, c) for f, c in zip(to_uint8_frames(x), captions)])
    assert real["color"] == 1.0  # the detectors read the originals; a random tokenizer's reconstructions need not
    assert q["color_error"] >= 0 and recon.shape == x.shape


TEXT = ["videoar.cond=text", "videoar.text_len=8", "videoar_train.quality_eval=true",
        "videoar_train.quality_samples=4"]
STAGES = ("curriculum=[{name: low, until_step: 2, resolution: [16, 16], frames: 5, scales: [1, 2], "
          "global_batch: 2, micro_batch: 2}, {name: high, until_step: 3, resolution: [32, 32], frames: 5, "
          "scales: [1, 2, 4], global_batch: 2, micro_batch: 2}]")


@pytest.fixture(scope="module")
def text_run(clips_dir, tokenizer_ckpt, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quality-run")
    cfg = make_cfg(clips_dir, tokenizer_ckpt, run_dir, STAGES, *TEXT)
    return train_videoar(cfg, progress=False), run_dir


def test_trainer_logs_quality_at_every_stage_end(text_run, clips_dir):
    run, run_dir = text_run
    out = run_dir / "videoar"
    records = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}
    held = sorted(clips_dir.glob("*.mp4"))[-2:]
    captions = list(dict.fromkeys(json.loads(p.with_suffix(".json").read_text())["caption"] for p in held))
    for step, stage in ((2, "low"), (3, "high")):
        rec = records[step]
        assert rec["quality/videos"] == len(captions) and 0 <= rec["quality/color"] <= 1
        report = json.loads((out / "quality" / f"step-{step:08d}" / "quality.json").read_text())
        assert report["stage"] == stage and report["prompts"] == captions
        assert report["quality/present"] == rec["quality/present"]
        # caption sensitivity of the stage's held-out samples (two latent frames: the direction gap exists)
        assert report["quality/direction_gap"] == rec["quality/direction_gap"] and "quality/color_gap" in rec
        sidecar = json.loads((out / "quality" / f"step-{step:08d}" / "text-to-video" / "sample-00.json").read_text())
        assert sidecar["prompt"] == captions[0] and sidecar["checkpoint_step"] == step
        assert set(sidecar["metrics"]) == {"color", "shape", "direction", "present"}
    assert "quality/color" not in records[1]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"quality/samples/low", "quality/samples/high"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Scalars("quality/color")] == [2, 3]


def test_cli_measures_drift_beyond_the_trained_length(text_run, clips_dir, tokenizer_ckpt, tmp_path):
    run, run_dir = text_run
    held = tmp_path / "held"
    held.mkdir()
    clip = sorted(clips_dir.glob("*.mp4"))[-1]
    for src in (clip, clip.with_suffix(".json")):
        shutil.copy(src, held / src.name)
    out = tmp_path / "q.json"
    assert evaluate_main(["--ckpt", str(run_dir / "videoar" / "checkpoints"), "--heldout", str(held), "--captions", "1",
                          "--drift-clips", "1", "--horizon", "2", "--out", str(tmp_path / "samples"),
                          "--json", str(out)]) == 0
    q = json.loads(out.read_text())
    assert len(q["drift"]) == 9 and q["quality/drift_frames"] == 9  # 2 x 4 frames after the given one
    assert q["quality/drift_trained"] == q["drift"][4] and q["quality/drift_end"] == q["drift"][8]
    assert {"quality/direction_gap", "quality/color_gap"} <= set(q)
    # frame 0 is the given frame through the tokenizer: its drift is that reconstruction's error, exactly
    tok, _, _ = load_tokenizer(tokenizer_ckpt)
    first = to_model_input(read_video(clip, num_frames=1, size=(32, 32)))
    rec = tok.decode_bits(tok.encode_bits(first), batch=1)
    rec_u8 = rec.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).float() / 127.5 - 1
    real = first.clamp(-1, 1)
    assert q["drift"][0] == pytest.approx(float(((rec_u8 - real).abs() / 2).mean()), abs=1e-6)
    meta = json.loads((tmp_path / "samples" / "image-to-video" / "clip-00" / "sample-00.json").read_text())
    assert meta["frames"] == 9 and meta["init_frames"] == 1
    assert meta["sampling"] == {"cfg_scale": 3.0, "cfg_schedule": "constant", "temperature": 1.0, "top_p": 1.0}
    # sampling overrides (a guidance sweep) reach the sampler and the sidecars; the run's config is left as it was
    assert evaluate_main(["--ckpt", str(run_dir / "videoar" / "checkpoints"), "--heldout", str(held), "--captions", "1",
                          "--drift-clips", "0", "--out", str(tmp_path / "swept"), "--cfg-scale", "5",
                          "--cfg-schedule", "ucf", "--temperature", "0", "--top-p", "0.8"]) == 0
    meta = json.loads((tmp_path / "swept" / "text-to-video" / "sample-00.json").read_text())
    assert meta["sampling"] == {"cfg_scale": 5.0, "cfg_schedule": "ucf", "temperature": 0.0, "top_p": 0.8}
    with pytest.raises(SystemExit):  # a bad override names its field
        evaluate_main(["--ckpt", str(run_dir / "videoar" / "checkpoints"), "--heldout", str(held), "--top-p", "0"])
