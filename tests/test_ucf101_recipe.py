"""configs/ucf101.yaml holds the paper's UCF-101 recipe (Appendix A), configs/ucf101_tiny.yaml keeps that recipe
at CPU size, and the tiny one runs end to end from a folder of class folders (UCF-101's layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.config import load_config
from data_pipeline.clips import folder_classes, list_clip_files, load_clip_folder, split_heldout
from data_pipeline.synth import generate_clips
from models.layout import SequenceLayout
from trainer.sample import sample_to_files
from trainer.train_tokenizer import train_tokenizer
from trainer.train_videoar import VideoARTrainer

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("Archery", "Biking", "Diving")

# (key, the paper's value) for every recipe setting both configs must hold (README "Reproducing the paper")
RECIPE = [
    ("data.class_folders", True), ("data.frames", 17), ("videoar.cond", "class"), ("videoar.cond_drop", 0.1),
    ("quantizer.scales", [1, 2, 3, 4, 6, 8]), ("quantizer.gain", "fixed"), ("tokenizer.temporal_compression", 4),
    ("videoar_train.lr", 1e-4), ("videoar_train.betas", [0.9, 0.95]), ("videoar_train.weight_decay", 0.05),
    ("videoar_train.flip_p_min", 0.0), ("videoar_train.flip_delta", 0.01), ("videoar_train.flip_inherit", True),
    ("sample.cfg_schedule", "ucf"), ("parallel.activation_checkpointing", True),
]


def value(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", ["ucf101", "ucf101_tiny"])
def test_both_configs_hold_the_papers_recipe(name):
    cfg = load_config(ROOT / f"configs/{name}.yaml")
    assert [(k, value(cfg, k)) for k, _ in RECIPE] == RECIPE
    (stage,) = cfg.curriculum
    assert (stage.flip_start, stage.flip_end, stage.frames) == (0.25, 0.25, 17) and stage.p_mask > 0
    grid = stage.resolution[0] // cfg.tokenizer.spatial_compression
    latent_frames = 1 + (stage.frames - 1) // cfg.tokenizer.temporal_compression
    layout = SequenceLayout(cfg.videoar.prefix_len, latent_frames, tuple(tuple(s) for s in stage.sizes))
    assert (latent_frames, grid, len(layout.blocks), layout.length - 1) == (5, 8, 30, 650)  # 5x8x8, 30 steps


def test_the_full_recipe_is_videoar_l_on_101_classes_at_128px_in_bf16():
    cfg = load_config(ROOT / "configs/ucf101.yaml")
    assert (cfg.videoar.preset, cfg.videoar.depth, cfg.videoar.width, cfg.videoar.heads) == ("L", 24, 1536, 12)
    assert cfg.videoar.num_classes == 101 and cfg.curriculum[0].resolution == [128, 128]
    assert cfg.videoar_train.precision == "bf16" and cfg.tokenizer.spatial_compression == 16
    assert cfg.tokenizer.latent_dim == 48


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> Path:
    """Three class folders of four real H.264 clips each; the Diving clips have no caption sidecar."""
    flat, root = tmp_path_factory.mktemp("flat"), tmp_path_factory.mktemp("ucf")
    generate_clips(flat, 12, frames=17, size=32, fps=8, seed=3, progress=False, world="easy")
    for i, video in enumerate(sorted(flat.glob("*.mp4"))):
        folder = root / CLASSES[i % 3]
        folder.mkdir(exist_ok=True)
        shutil.move(video, folder / f"v_{CLASSES[i % 3]}_g{i:02d}.mp4")
        if CLASSES[i % 3] != "Diving":
            shutil.move(video.with_suffix(".json"), folder / f"v_{CLASSES[i % 3]}_g{i:02d}.json")
    return root


def test_class_folders_give_class_ids_captions_and_a_held_out_tail_across_classes(class_folders):
    files = list_clip_files(class_folders, class_folders=True)
    assert [(p.parent.name, c) for p, c, _ in files[:3]] == [("Archery", 0), ("Biking", 1), ("Diving", 2)]
    assert len(files) == 12 and all(CLASSES[c] == p.parent.name == name for p, c, name in files)
    clips = load_clip_folder(class_folders, (32, 32), 17, progress=False, class_folders=True)
    _, held = split_heldout(clips, 3, class_folders)
    assert sorted(c.class_id for c in held) == [0, 1, 2]  # the tail spans the classes
    diving = [c for c in clips if c.class_id == 2]
    assert all(c.caption == "Diving" for c in diving)  # no sidecar: the folder's name
    archery = [c for c in clips if c.class_id == 0]
    assert all(c.caption == json.loads(c.path.with_suffix(".json").read_text())["caption"] for c in archery)
    assert folder_classes(["b/x.avi", "a/y.avi", "b/z.avi"]) == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="loose.mp4 .* is not inside a class folder"):
        folder_classes(["a/y.avi", "loose.mp4"])
    with pytest.raises(FileNotFoundError, match="sub-folders of videos, one per class"):
        load_clip_folder(class_folders / "Archery", (32, 32), 17, progress=False, class_folders=True)


def test_tiny_recipe_trains_and_samples_from_class_folders(class_folders, tmp_path):
    """Tokenizer and VideoAR from the class folders with ucf101_tiny.yaml (a few steps), then a class sample of
    17 frames in the recipe's 30 decoding steps with the UCF guidance schedule."""
    common = [f"data.clips_dir={class_folders}", f"run.dir={tmp_path}", "data.heldout_clips=3"]
    tok_cfg = load_config(ROOT / "configs/ucf101_tiny.yaml", common + [
        "tokenizer_train.steps=2", "tokenizer_train.eval_every=2", "tokenizer_train.ckpt_every=2"])
    tok_run = train_tokenizer(tok_cfg, progress=False)
    cfg = load_config(ROOT / "configs/ucf101_tiny.yaml", common + [
        f"videoar_train.tokenizer_ckpt={tok_run.checkpoint}", "curriculum.0.until_step=2",
        "curriculum.0.global_batch=3", "curriculum.0.micro_batch=3", "videoar_train.ckpt_every=2"])
    trainer = VideoARTrainer(cfg, progress=False)
    run = trainer.train()
    assert run.step == 2 and len(run.losses) == 2
    _, classes = trainer.loader.datasets[0].batch(list(range(len(trainer.loader.datasets[0]))))
    assert sorted(classes.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 9 training clips, their folders' ids
    out = sample_to_files(tmp_path / "videoar" / "checkpoints", tmp_path / "samples", class_ids=[2])
    assert out.frames.shape == (1, 17, 32, 32, 3) and out.forwards == 30
    meta = json.loads((tmp_path / "samples" / "sample-00.json").read_text())
    assert meta["class"] == 2 and meta["sampling"]["cfg_schedule"] == "ucf"


def test_preprocessing_labels_samples_by_their_class_folder(class_folders, tokenizer_ckpt, tmp_path):
    """The Ray preprocessing job on class folders: every sample's class is its source's folder index and its
    caption the sidecar's, or the folder name without one."""
    import webdataset as wds

    from data_pipeline.preprocess import preprocess
    from tests.conftest import make_cfg

    stage = ("curriculum=[{name: s, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
             "global_batch: 2, micro_batch: 2}]")
    cfg = make_cfg(class_folders, tokenizer_ckpt, tmp_path / "run", stage, "data.class_folders=true",
                   f"preprocess.input={class_folders}", f"preprocess.output={tmp_path / 'shards'}",
                   "preprocess.workers=1", "preprocess.batch_size=4", "preprocess.max_clips_per_video=1")
    summary = preprocess(cfg, progress=False)
    assert summary.quarantined == 0 and summary.total_samples == 12
    samples = [s for tar in sorted((tmp_path / "shards").rglob("*.tar"))
               for s in wds.WebDataset(str(tar), shardshuffle=False).decode()]
    assert len(samples) == 12
    for s in samples:
        folder = Path(s["json"]["source"]).parent.name
        assert int(s["cls"]) == CLASSES.index(folder)
        assert (s["txt"] == "Diving") == (folder == "Diving")
