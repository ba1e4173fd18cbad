"""Joint image-video stages (the paper's stages I and II): a step mixes images (frames = 1, their own resolution
and scales) with clips, each part with its own share of the global batch and its own data stream; the engines
accumulate both shapes into one mean gradient; configs/stages_tiny.yaml runs through its three stage switches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import load_config
from common.metrics import read_jsonl
from data_pipeline.video_io import read_video
from models.objective import BitObjective, prepare_batch, sample_generator
from models.quantizer import MultiScaleBitwiseQuantizer
from models.videoar import VideoAR
from parallel.engine import TorchEngine
from parallel.launch import run_local as run_ranks
from parallel.topology import SINGLE
from tests.conftest import TINY, VIDEOAR
from trainer.curriculum import Curriculum
from trainer.train_videoar import VideoARTrainer

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 3  # image files added to the clips folder


@pytest.fixture(scope="module")
def media_dir(clips_dir, tmp_path_factory) -> Path:
    """The session clips plus three PNG images (a clip's 4th frame, with a copy of its caption sidecar)."""
    out = tmp_path_factory.mktemp("media")
    for f in sorted(clips_dir.iterdir()):
        shutil.copy(f, out / f.name)
    for i in range(IMAGES):
        frame = read_video(clips_dir / f"clip-{i:05d}.mp4")[3]
        Image.fromarray(frame).save(out / f"photo-{i:02d}.png")
        shutil.copy(clips_dir / f"clip-{i:05d}.json", out / f"photo-{i:02d}.json")
    return out


def tiny_cfg(media_dir, tokenizer_ckpt, run_dir, *extra):
    return load_config(ROOT / "configs/stages_tiny.yaml", [f"data.clips_dir={media_dir}", f"run.dir={run_dir}",
                                                            f"videoar_train.tokenizer_ckpt={tokenizer_ckpt}", *extra])


def test_two_shapes_in_one_step_give_the_mean_gradient_of_all_micro_batches():
    """forward_backward over an image group and a clip group: the gradient equals autograd of the mean of the
    micro-batch losses computed directly (each micro-batch weighs the same), and the loss is that mean."""
    cfg = load_config(None, TINY + VIDEOAR)
    torch.manual_seed(0)
    model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim)
    base = MultiScaleBitwiseQuantizer(cfg.tokenizer.latent_dim, cfg.quantizer)
    stage = Curriculum(cfg.curriculum).stages[0]
    groups = []
    for frames, sizes, n in ((2, [(1, 1), (2, 2)], 4), (1, [(1, 1), (2, 2), (4, 4)], 2)):  # clips, images
        q = base.for_sizes(sizes)
        lat = torch.randn(n, frames, q.dim, *sizes[-1], generator=torch.Generator().manual_seed(frames))
        layout = model.layout_for(frames, q.sizes)
        batch = prepare_batch(q, layout, lat, torch.arange(n) % 4, stage, 0.0, 0.2, 0.0, 0.01,
                              [sample_generator(0, 0, j) for j in range(n)])
        groups.append((batch.split(2), BitObjective(layout.length - layout.prefix_len)))
    engine = TorchEngine(model, model.parallel_plan(), SINGLE, cfg.parallel, cfg.videoar_train, 10,
                         torch.device("cpu"))
    loss, stats = engine.forward_backward(groups)
    loss = loss.detach()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    losses = [obj(model(*mb.model_args()), mb.targets)[0] for micro, obj in groups for mb in micro]
    torch.stack(losses).mean().backward()
    assert len(losses) == 3 and float(loss) == pytest.approx(float(torch.stack(losses).mean()), rel=1e-6)
    assert [s.shape[0] for s in stats] == [obj.stats_size for _, obj in groups]
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_tiny_three_stage_preset_runs_through_its_switches_and_resumes(media_dir, tokenizer_ckpt, tmp_path):
    cfg = tiny_cfg(media_dir, tokenizer_ckpt, tmp_path / "run")
    trainer = VideoARTrainer(cfg, progress=False)
    trainer.train(max_steps=2)
    (j_v, video, q_v), (j_i, images, q_i) = trainer.parts
    clips_v, clips_i = trainer.loader.datasets[j_v], trainer.loader.datasets[j_i]
    # stage I: 2 clips of 5 frames at 16x16 (2 latent frames of a 2x2 grid) + 2 images of 32x32 (1 of 4x4)
    assert clips_v.latents.shape[1:] == (2, 8, 2, 2) and clips_i.latents.shape[1:] == (1, 8, 4, 4)
    assert (q_v.sizes[-1], q_i.sizes[-1]) == ((2, 2), (4, 4))
    # every frame of the 6 training clips (13 frames each) + the 3 image files, minus the held-out tail (2 clips)
    assert len(clips_i) == 6 * 13 + IMAGES and len(clips_v) == 6 * 2
    run = trainer.train()  # the same trainer goes on across both stage switches
    assert run.step == 12
    recs = [r for r in read_jsonl(tmp_path / "run" / "videoar" / "metrics.jsonl") if "loss" in r]
    assert [r["stage"] for r in recs] == ["I"] * 4 + ["II"] * 4 + ["III"] * 4
    assert all(("images/bit_acc" in r) == (r["stage"] != "III") for r in recs)
    video_tokens = {"I": 2 * (2 * (1 + 4)) + 2 * (1 + 4 + 16), "II": 2 * (2 * 21) + 2 * (1 + 9 + 36),
                    "III": 2 * (3 * 21)}
    assert [r["tokens"] for r in recs] == [video_tokens[r["stage"]] for r in recs]
    assert trainer.loader.consumed == trainer.curriculum.expected_consumed(12) == [8, 8, 8, 8, 8]
    # resume from step 6 (inside stage II) equals the uninterrupted run
    first = VideoARTrainer(tiny_cfg(media_dir, tokenizer_ckpt, tmp_path / "resumed"), progress=False)
    a = first.train(max_steps=6).losses
    b = VideoARTrainer(tiny_cfg(media_dir, tokenizer_ckpt, tmp_path / "resumed"), progress=False).train().losses
    assert a + b == pytest.approx([r["loss"] for r in recs], rel=1e-6)


def test_a_changed_image_share_is_refused_on_resume(media_dir, tokenizer_ckpt, tmp_path):
    VideoARTrainer(tiny_cfg(media_dir, tokenizer_ckpt, tmp_path), progress=False).train(max_steps=2)
    changed = tiny_cfg(media_dir, tokenizer_ckpt, tmp_path, "curriculum.0.image_batch=0")
    with pytest.raises(ValueError, match="data streams"):
        VideoARTrainer(changed, progress=False).train()


JOINT = ["curriculum.0.until_step=3", "curriculum.1.until_step=5", "curriculum.2.until_step=6",
         "curriculum.0.micro_batch=1", "curriculum.0.p_mask=0.3", "curriculum.0.flip_end=0.2",
         "videoar_train.grad_clip=0.05"]


def _joint_run(rank, world, media_dir, tokenizer_ckpt, run_dir, pp, zero, out):
    cfg = tiny_cfg(media_dir, tokenizer_ckpt, run_dir, *JOINT, f"parallel.pp={pp}", f"parallel.zero_stage={zero}")
    trainer = VideoARTrainer(cfg, progress=False)
    run = trainer.train()
    torch.save({"losses": run.losses, "pp_rank": trainer.topo.pp_rank, "dp_rank": trainer.topo.dp_rank,
                "state": trainer.engine.local_model_state()}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("pp, zero", [(1, 0), (2, 0), (1, 2)], ids=["dp2", "pp2", "dp2-zero2"])
def test_joint_stages_on_two_ranks_equal_one_process(pp, zero, media_dir, tokenizer_ckpt, tmp_path):
    """Data parallel (images and clips each split over the ranks), a pipeline (one schedule per shape, both
    accumulating into one step) and DeepSpeed ZeRO-2 (one accumulation boundary over both shapes) each compute
    the single-process run: 6 losses across two joint stages and a video stage, relative 1e-5, and the weights
    (pipeline stages merged) relative 1e-5 per tensor."""
    ref = VideoARTrainer(tiny_cfg(media_dir, tokenizer_ckpt, tmp_path / "single", *JOINT), progress=False)
    ref_losses = ref.train().losses
    run_ranks(2, _joint_run, media_dir, tokenizer_ckpt, tmp_path / "run", pp, zero, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5)
    full = {k: v for r in results if r["dp_rank"] == 0 for k, v in r["state"].items()}
    ref_state = ref.model.state_dict()
    assert set(full) == set(ref_state)
    for name, value in ref_state.items():
        rel = ((full[name] - value).norm() / value.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-5, (name, rel)


@pytest.mark.slow
def test_preprocessing_writes_image_samples_and_training_reads_them(media_dir, tokenizer_ckpt, tmp_path):
    """A joint stage's preprocessing writes the `<H>x<W>x1` bucket from the image files and the videos' frames
    (every `preprocess.stride`-th), and the trainer streams both parts from the shards."""
    from data_pipeline.preprocess import preprocess

    src = tmp_path / "labelled"  # class conditioning from shards needs a "class" in every sidecar
    shutil.copytree(media_dir, src)
    for i, sidecar in enumerate(sorted(src.glob("*.json"))):
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "class": i % 8}))
    shards = tmp_path / "shards"
    cfg = tiny_cfg(src, tokenizer_ckpt, tmp_path / "run", f"preprocess.input={src}",
                   f"preprocess.output={shards}", "preprocess.workers=1", "preprocess.stride=4",
                   "curriculum=[{name: I, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
                   "global_batch: 4, image_batch: 2, micro_batch: 1}]")
    summary = preprocess(cfg, progress=False)
    manifest = json.loads((shards / "manifest.json").read_text())
    videos = len(list(media_dir.glob("*.mp4")))
    # frames 0, 4, 8, 12 of each 13-frame video and each image; clips of 5 frames start at 0, 4, 8
    assert manifest["buckets"]["32x32x1"]["samples"] == videos * 4 + IMAGES
    assert manifest["buckets"]["32x32x5"]["samples"] == videos * 3
    assert summary.quarantined == 0 and summary.not_videos == []
    run_cfg = tiny_cfg(src, tokenizer_ckpt, tmp_path / "run", f"data.shards={shards}",
                       "curriculum=[{name: I, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
                       "global_batch: 4, image_batch: 2, micro_batch: 1}]")
    trainer = VideoARTrainer(run_cfg, progress=False)
    run = trainer.train()
    assert run.step == 2 and all(np.isfinite(run.losses))
    assert [trainer.loader.datasets[j].bucket for j, _, _ in trainer.parts] == ["32x32x5", "32x32x1"]
