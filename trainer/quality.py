"""Does the trained VideoAR make the videos its captions ask for? (issue 15) Sampled, then scored without any
downloaded weights:

- text-to-video for held-out captions: colour, shape and direction accuracy of the named object and its presence
  across frames (trainer/video_metrics.py `caption_scores`, detectors from the synthetic world's rules);
- image-to-video from held-out clips: per-frame error of the continuation against the real clip (drift), up to
  `horizon` times the trained length, read off at the last trained frame and at the end.

Used by `python -m trainer.evaluate_videos --ckpt`, by the trainer at stage ends (videoar_train.quality_every_stage),
by the demo summary and by `python -m benchmarks.ablation`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_write_text
from common.config import Config
from data_pipeline.clips import read_caption, to_model_input
from data_pipeline.synth import COLORS, WORLDS
from data_pipeline.video_io import read_video
from models.tokenizer import VideoTokenizer
from models.videoar import VideoAR
from trainer.curriculum import StageConfig
from parallel.collectives import barrier
from trainer.caption_sensitivity import caption_gaps
from trainer.sample import load_videoar, sample_model_to_files, text_encoder
from trainer.video_metrics import drift_curve, mean_scores, parse_caption

log = logging.getLogger("quality")
GAP_SAMPLES = 64  # held-out samples of the caption-sensitivity gaps at stage ends


@dataclass
class QualityReport:
    scores: dict[str, float]  # mean caption scores: color, shape, direction, present, present_90, videos
    drift: list[float] = field(default_factory=list)  # per video frame, mean over the image-to-video clips
    trained_frames: int = 0  # the stage's clip length: drift[trained_frames - 1] is the last trained frame
    contact_sheet: Path | None = None
    gaps: dict[str, float] = field(default_factory=dict)  # quality/{direction,color}_gap (caption_sensitivity)
    gap_tables: dict[str, list] = field(default_factory=dict)  # the same per [latent frame][scale]

    def metrics(self) -> dict[str, float]:
        """Flat `quality/*` numbers for the metric sinks and tables."""
        out = {**{f"quality/{k}": float(v) for k, v in self.scores.items()}, **self.gaps}
        if self.drift:
            out["quality/drift_trained"] = self.drift[min(self.trained_frames, len(self.drift)) - 1]
            out["quality/drift_end"] = self.drift[-1]
            out["quality/drift_frames"] = float(len(self.drift))
        return out


def unique_captions(captions: list[str], limit: int) -> list[str]:
    """The first `limit` distinct captions, in order (held-out clips may repeat one)."""
    return list(dict.fromkeys(captions))[:limit]


@torch.no_grad()
def caption_quality(model: VideoAR, cfg: Config, step: int, tokenizer: VideoTokenizer, stage: StageConfig,
                    prompts: list[str], out_dir: Path, seed: int) -> tuple[dict[str, float], Path]:
    """(mean caption scores, contact sheet) of text-to-video samples of `prompts`, written to `out_dir`."""
    samples = sample_model_to_files(model, cfg, step, tokenizer, out_dir, prompts=prompts, stage=stage, seed=seed)
    return mean_scores(samples.scores), samples.contact_sheet


@torch.no_grad()
def drift_quality(model: VideoAR, cfg: Config, step: int, tokenizer: VideoTokenizer, stage: StageConfig,
                  clips: list[Path], out_dir: Path, seed: int, horizon: int = 2) -> list[float]:
    """Per-frame drift (mean absolute error in [0, 1] units) of image-to-video continuations of `clips` (first
    frame given, caption as the condition) against the real clips, over `horizon` x the trained length (as far
    as the clips reach)."""
    tau = tokenizer.cfg.temporal_compression
    want = 1 + horizon * (stage.frames - 1)
    curves = []
    for i, clip in enumerate(clips):
        real = read_video(clip, num_frames=want, size=tuple(stage.resolution))
        frames = 1 + (len(real) - 1) // tau * tau  # the longest 1 + k * tau the clip covers
        prompts, class_ids = ([read_caption(clip)], []) if cfg.videoar.cond == "text" else ([], [0])
        gen = sample_model_to_files(model, cfg, step, tokenizer, out_dir / f"clip-{i:02d}", prompts, class_ids,
                                    stage=stage, init=clip, init_frames=1, seed=seed, frames=frames)
        generated = to_model_input(gen.frames[0])
        curves.append(drift_curve(generated, to_model_input(real[:frames])))
    n = min(len(c) for c in curves) if curves else 0
    return [float(np.mean([c[t] for c in curves])) for t in range(n)]


def gap_quality(model: VideoAR, cfg: Config, tokenizer: VideoTokenizer, stage: StageConfig,
                gap_data: tuple[torch.Tensor, list[str]] | None, tables: dict | None = None) -> dict[str, float]:
    """Caption sensitivity (trainer/caption_sensitivity.py) of held-out (latents, captions); {} without them.
    `tables` receives the gaps by latent frame and scale."""
    if gap_data is None or not len(gap_data[1]) or cfg.videoar.cond != "text":
        return {}
    colors = WORLDS[cfg.data.synth_world].colors if cfg.data.synth_world in WORLDS else tuple(COLORS)
    encoder = text_encoder(cfg.videoar.text_encoder, cfg.videoar.text_len)
    quantizer = tokenizer.quantizer.for_sizes(stage.sizes)  # the stage's scale schedule
    return caption_gaps(model, quantizer, stage, encoder, gap_data[0], list(gap_data[1]), colors, tables)


def evaluate_quality(model: VideoAR, cfg: Config, step: int, tokenizer: VideoTokenizer, out_dir: str | Path,
                     prompts: list[str], drift_clips: list[Path] = (), stage: StageConfig | None = None,
                     seed: int = 0, horizon: int = 2, gap_data: tuple[torch.Tensor, list[str]] | None = None
                     ) -> QualityReport:
    """Caption scores of `prompts`, drift over `drift_clips` and caption sensitivity of `gap_data` (held-out
    latents (N, T, d, h, w) and their captions); samples under out_dir/{text-to-video, image-to-video}/, the
    numbers in out_dir/quality.json."""
    out_dir, stage = Path(out_dir), stage or cfg.curriculum[-1]
    was_training = model.training
    model.eval()
    try:
        scores, sheet = caption_quality(model, cfg, step, tokenizer, stage, prompts, out_dir / "text-to-video", seed) \
            if prompts else ({}, None)
        drift = drift_quality(model, cfg, step, tokenizer, stage, list(drift_clips), out_dir / "image-to-video", seed,
                              horizon) if drift_clips else []
        tables: dict[str, list] = {}
        gaps = gap_quality(model, cfg, tokenizer, stage, gap_data, tables)
    finally:
        model.train(was_training)
    report = QualityReport(scores, drift, stage.frames, sheet, gaps, tables)
    atomic_write_text(out_dir / "quality.json", json.dumps({"step": step, "stage": stage.name, "prompts": prompts,
                                                            "drift_clips": [str(c) for c in drift_clips],
                                                            "drift": drift, "gap_tables": tables,
                                                            **report.metrics()}, indent=1) + "\n")
    return report


def describe(report: QualityReport) -> str:
    """One line for summaries: 'colour 0.94, shape 0.62, direction 0.81, object in >= 90% of frames 0.94 (16
    videos); drift 0.031 at frame 9, 0.055 at frame 17'."""
    s = report.scores
    text = (f"colour {s['color']:.2f}, shape {s['shape']:.2f}, direction {s['direction']:.2f}, object in >= 90% "
            f"of frames {s['present_90']:.2f} ({int(s['videos'])} videos)") if s else "no synthetic-world captions"
    if report.drift:
        m = report.metrics()
        text += (f"; drift {m['quality/drift_trained']:.3f} at frame {min(report.trained_frames, len(report.drift))}"
                 f", {m['quality/drift_end']:.3f} at frame {len(report.drift)}")
    if report.gaps:
        text += "; caption gaps (nats/bit) " + ", ".join(
            f"{k.split('/')[1].replace('_gap', '').replace('color', 'colour')} {v:.4f}" for k, v in report.gaps.items())
    return text


def stage_end_quality(trainer, step: int, sinks) -> dict[str, float]:
    """videoar_train.quality_eval at a stage end: rank 0 samples the stage's distinct held-out captions from the
    checkpoint of `step` (any parallel layout saved it) and logs the contact sheet to TensorBoard; every rank
    waits for it at a barrier. Returns rank 0's quality/* metrics ({} on other ranks or without held-out data)."""
    out: dict[str, float] = {}
    trainer.checkpoints.wait()  # the step's checkpoint is committed
    if trainer.topo.rank == 0:
        index = trainer.curriculum.index(step - 1)
        stage = trainer.curriculum.stages[index]
        d = trainer.cfg.data
        no_data = (d.shards and not d.eval_shards) or trainer.cfg.videoar.cond != "text"  # captions score text
        data = None if no_data else trainer.evaluator.data_for(index)
        prompts = unique_captions(data.texts(list(range(len(data)))), trainer.cfg.videoar_train.quality_samples) \
            if data is not None and len(data) else []
        if not any(parse_caption(p) for p in prompts):
            log.warning("stage %s: no held-out synthetic-world captions (a text-conditioned model and held-out data, "
                        "data.eval_shards when training reads shards, are needed); quality evaluation skipped",
                        stage.name)
        else:
            model, cfg, _ = load_videoar(trainer.checkpoints.root / f"step-{step:08d}", str(trainer.device))
            held = list(range(min(len(data), GAP_SAMPLES)))
            report = evaluate_quality(model, cfg, step, trainer.tokenizer, trainer.checkpoints.root.parent / "quality"
                                      / f"step-{step:08d}", prompts, stage=stage, seed=cfg.run.seed,
                                      gap_data=(data.batch(held)[0], data.texts(held)))
            out = report.metrics()
            log.info("quality at step %d (stage %s): %s", step, stage.name, describe(report))
            if sinks is not None and report.contact_sheet is not None:
                sinks.log_image(f"quality/samples/{stage.name}", report.contact_sheet, step)
    barrier()
    return out
