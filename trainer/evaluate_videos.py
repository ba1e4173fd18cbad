"""Score videos against their captions with the synthetic world's detectors (no downloaded weights).

    python -m trainer.evaluate_videos --samples DIR [--json OUT]

Every `*.mp4` in DIR with a `.json` sidecar holding "prompt" or "caption" (generated samples, or the synthetic
clips themselves: those score ~1.0, a check of the detectors) is scored for the caption's first object: colour,
shape and direction accuracy and presence across frames. Prints one table; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from common.atomic import atomic_write_text
from data_pipeline.video_io import read_video
from trainer.video_metrics import caption_scores, mean_scores


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--samples", required=True, help="folder of .mp4 files with .json sidecars")
    parser.add_argument("--json", help="write {'mean': ..., 'videos': [...]} here")
    args = parser.parse_args(argv)
    try:
        mean, rows = score_folder(args.samples)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"{int(mean['videos'])} videos: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if k != "videos"))
    if args.json:
        atomic_write_text(args.json, json.dumps({"mean": mean, "videos": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
