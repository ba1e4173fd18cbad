"""Score videos against their captions with the synthetic world's detectors (no downloaded weights).

    python -m trainer.evaluate_videos --samples DIR [--json OUT]
    python -m trainer.evaluate_videos --ckpt RUN/videoar/checkpoints --heldout DIR [--captions 16] [--drift-clips 4]
                                      [--horizon 2] [--out DIR] [--json OUT] [--cfg-scale 3 --cfg-schedule constant
                                      --temperature 0.5 --top-p 0.9]
    python -m trainer.evaluate_videos --samples DIR --fvd-extractor i3d.pt --reference DIR

--samples: every `*.mp4` in DIR with a `.json` sidecar holding "prompt" or "caption" (generated samples, or the
synthetic clips themselves: those score ~1.0, a check of the detectors) is scored for the caption's first object:
colour, shape and direction accuracy and presence across frames.
--ckpt: samples the checkpoint first (trainer/quality.py): text-to-video for the distinct captions of the held-out
clips in --heldout, and image-to-video from their first frames, whose drift from the real clips is measured per
frame up to --horizon x the trained length (the clips must be that long to measure it all). Sampling follows the
run's `sample` settings unless --cfg-scale/--cfg-schedule/--temperature/--top-p override them (a guidance sweep).
--fvd-extractor: Fréchet video distance between --samples and --reference over the features of a TorchScript
video network you supply (e.g. an exported I3D; none ships here).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from common.atomic import atomic_write_text
from data_pipeline.clips import read_caption
from data_pipeline.tokenizer_ckpt import load_tokenizer
from data_pipeline.video_io import read_video
from trainer.caption_sensitivity import clip_latents
from trainer.quality import describe, evaluate_quality, unique_captions
from trainer.sample import add_sampling_args, load_videoar, sampling_overrides
from trainer.video_metrics import caption_scores, fvd, load_feature_extractor, mean_scores


def score_folder(folder: str | Path, progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """(mean scores, per-video rows) over the captioned videos of `folder`."""
    folder = Path(folder)
    videos = sorted(folder.glob("*.mp4"))
    if not videos:
        raise FileNotFoundError(f"{folder}: no .mp4 files to score")
    rows = []
    for path in tqdm(videos, desc="scoring videos", unit="video", disable=not progress):
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise ValueError(f"{meta_path}: not JSON ({e})") from None
        caption = meta.get("prompt") or meta.get("caption")
        scores = caption_scores(read_video(path), caption) if caption else None
        if scores is not None:
            rows.append({"video": path.name, "caption": caption, **scores})
    if not rows:
        raise ValueError(f"{folder}: no video has a sidecar with a synthetic-world 'prompt' or 'caption'")
    return mean_scores([{k: r[k] for k in ("color", "shape", "direction", "present")} for r in rows]), rows


def folder_fvd(extractor_path: str, samples: str | Path, reference: str | Path) -> float:
    """FVD between the .mp4 files of two folders."""
    extractor = load_feature_extractor(extractor_path)
    sets = []
    for folder in (samples, reference):
        paths = sorted(Path(folder).glob("*.mp4"))
        if len(paths) < 2:
            raise ValueError(f"{folder}: FVD needs at least 2 .mp4 files, found {len(paths)}")
        sets.append([read_video(p) for p in paths])
    return fvd(extractor, *sets)


def evaluate_checkpoint(ckpt: str, heldout: str, out: str | None, captions: int, drift_clips: int,
                        horizon: int, seed: int, sampling: dict | None = None):
    """Sample a checkpoint for the held-out clips' captions and first frames, and score it; `sampling` overrides
    the run's `sample` settings (cfg_scale, cfg_schedule, temperature, top_p)."""
    clips = sorted(p for p in Path(heldout).glob("*.mp4") if p.with_suffix(".json").is_file()
                   or p.with_suffix(".txt").is_file())
    if not clips:
        raise FileNotFoundError(f"{heldout}: no .mp4 clips with a .json/.txt caption sidecar")
    model, cfg, step = load_videoar(ckpt)
    cfg = replace(cfg, sample=replace(cfg.sample, **(sampling or {})))
    tokenizer, _, _ = load_tokenizer(cfg.videoar_train.tokenizer_ckpt)
    prompts = unique_captions([read_caption(c) for c in clips], captions) if cfg.videoar.cond == "text" else []
    out_dir = Path(out) if out else Path(ckpt).resolve().parent.parent / "quality" / f"step-{step:08d}"
    gap_data = clip_latents(tokenizer, clips, cfg.curriculum[-1]) if cfg.videoar.cond == "text" else None
    return evaluate_quality(model, cfg, step, tokenizer, out_dir, prompts, clips[:drift_clips], seed=seed,
                            horizon=horizon, gap_data=gap_data), out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--samples", help="folder of .mp4 files with .json sidecars")
    parser.add_argument("--ckpt", help="VideoAR checkpoints root, step directory or consolidated file to sample")
    parser.add_argument("--heldout", help="with --ckpt: folder of held-out clips (.mp4 + caption sidecars)")
    parser.add_argument("--captions", type=int, default=16, help="with --ckpt: distinct held-out captions to sample")
    parser.add_argument("--drift-clips", type=int, default=4, help="with --ckpt: image-to-video clips for drift")
    parser.add_argument("--horizon", type=int, default=2, help="with --ckpt: drift up to this x the trained length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="with --ckpt: where samples go (default: <run>/videoar/quality/step-N)")
    add_sampling_args(parser)  # with --ckpt
    parser.add_argument("--fvd-extractor", help="TorchScript video network: (B,3,T,H,W) in [-1,1] -> (B,D)")
    parser.add_argument("--reference", help="with --fvd-extractor: folder of real .mp4 videos")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    if bool(args.samples) == bool(args.ckpt) or (args.ckpt and not args.heldout):
        parser.error("give --samples DIR, or --ckpt CKPT with --heldout DIR")
    if bool(args.fvd_extractor) != bool(args.reference) or (args.fvd_extractor and not args.samples):
        parser.error("--fvd-extractor needs --reference and --samples")
    result: dict = {}
    try:
        if args.ckpt:
            report, out_dir = evaluate_checkpoint(args.ckpt, args.heldout, args.out, args.captions,
                                                  args.drift_clips, args.horizon, args.seed, sampling_overrides(args))
            print(f"{describe(report)}\nsamples: {out_dir}")
            for attribute, table in report.gap_tables.items():  # where the model reads each word
                print(f"{attribute} gap (nats/bit) by latent frame (rows) and scale (columns):")
                print("\n".join(f"  frame {t}: " + " ".join(f"{v:+.4f}" for v in row) for t, row in enumerate(table)))
            result = {**report.metrics(), "drift": report.drift, "gap_tables": report.gap_tables}
        else:
            mean, rows = score_folder(args.samples)
            print(f"{int(mean['videos'])} videos: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()
                                                                 if k != "videos"))
            result = {"mean": mean, "videos": rows}
            if args.fvd_extractor:
                result["fvd"] = folder_fvd(args.fvd_extractor, args.samples, args.reference)
                print(f"FVD {result['fvd']:.3f} ({args.samples} vs {args.reference})")
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
