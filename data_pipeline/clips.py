"""A folder of clips decoded into memory, and random training windows over it.

This is the small, local data path used by tokenizer training and the demo; the sharded streaming loader over
pre-tokenized WebDataset shards replaces it for pretraining at scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.video_io import read_video


@dataclass
class Clip:
    path: Path
    frames: np.ndarray  # uint8 (T, H, W, 3)
    caption: str
    class_id: int | None = None


def parse_sidecar(name: str, json_bytes: bytes | None, txt_bytes: bytes | None,
                  strict: bool = True) -> tuple[str, int | None]:
    """(caption, class id) of a video from its `<stem>.json` ("caption", optional "class") or `<stem>.txt` sidecar.

    The one place that knows the sidecar format; `name` is the JSON sidecar's path for errors. A malformed JSON
    sidecar raises with `strict`, else reads as no caption (the preprocessor keeps going over millions of inputs).
    """
    if json_bytes is not None:
        try:
            meta = json.loads(json_bytes)
            caption = meta["caption"] if strict else meta.get("caption", "")
            return str(caption), (int(meta["class"]) if meta.get("class") is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if strict:
                raise ValueError(f"{name}: caption sidecar is not JSON with a 'caption' field ({e})") from None
            return "", None
    if txt_bytes is not None:
        return txt_bytes.decode("utf-8", "replace").strip(), None
    return "", None


def read_sidecar(video_path: Path) -> tuple[str, int | None]:
    """(caption, class id) from the sidecar next to a local video file; see `parse_sidecar`."""
    meta, txt = video_path.with_suffix(".json"), video_path.with_suffix(".txt")
    return parse_sidecar(str(meta), meta.read_bytes() if meta.is_file() else None,
                         txt.read_bytes() if txt.is_file() else None)


def read_caption(video_path: Path) -> str:
    """Caption from a `.json` sidecar ("caption" field) or a `.txt` sidecar; empty if there is none."""
    return read_sidecar(video_path)[0]


VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}  # single-frame samples of joint image-video stages
SIDECAR_EXTS = {".json", ".txt"}  # a video's caption (`parse_sidecar`)


def folder_classes(keys: list[str]) -> dict[str, int]:
    """Class folder name -> class id (its index among the sorted names) of relative video paths laid out as
    `<class>/<video>` (UCF-101's layout, `data.class_folders`); a video outside a class folder is refused."""
    loose = [k for k in keys if len(Path(k).parts) < 2]
    if loose:
        raise ValueError(f"data.class_folders=true, but {loose[0]} (and {len(loose) - 1} more) is not inside a class "
                         f"folder: lay videos out as <class>/<video> or set data.class_folders=false")
    return {name: i for i, name in enumerate(sorted({Path(k).parts[0] for k in keys}))}


def list_clip_files(folder: str | Path, class_folders: bool = False, images: bool = False
                    ) -> list[tuple[Path, int | None, str | None]]:
    """(path, class id, class name) of the clips in `folder`: its .mp4 files sorted by name, or with
    `class_folders` the videos in its sub-folders, one class per sub-folder, interleaved across classes (each
    class's first video, then each one's second, ...) so the held-out tail (`split_heldout`) spans classes.
    `images` adds the image files (IMAGE_EXTS), sorted in with the videos: the samples of a frames = 1 stage part."""
    folder = Path(folder)
    if not class_folders:
        keep = {".mp4"} | (IMAGE_EXTS if images else set())
        return [(p, None, None) for p in (sorted(q for q in folder.glob("*") if q.suffix.lower() in keep)
                                          if folder.is_dir() else [])]
    media = sorted(str(p.relative_to(folder)) for p in folder.glob("*/*")
                   if p.suffix.lower() in VIDEO_EXTS | IMAGE_EXTS)
    classes = folder_classes(media)  # over videos and images alike: every part of a run agrees on the ids
    keep = VIDEO_EXTS | (IMAGE_EXTS if images else set())
    rel = [r for r in media if Path(r).suffix.lower() in keep]
    per_class: dict[str, list[str]] = {name: [] for name in classes}
    for r in rel:  # one pass: grouping stays linear in the number of files
        per_class[Path(r).parts[0]].append(r)
    order = sorted((i, c) for c, paths in enumerate(per_class.values()) for i in range(len(paths)))
    names = list(classes)
    return [(folder / per_class[names[c]][i], c, names[c]) for i, c in order]


def caption_vocabulary(folder: str | Path, class_folders: bool = False) -> list[str]:
    """The distinct captions (sidecar caption, else class folder name) of every video and image in `folder`,
    sorted: the class ids of caption-ranked class conditioning (`latent_set.class_ids`)."""
    files = list_clip_files(folder, class_folders, images=True)
    return sorted({read_sidecar(path)[0] or name or "" for path, _, name in files})


def load_clip_folder(folder: str | Path, resolution: tuple[int, int], min_frames: int,
                     progress: bool = True, class_folders: bool = False) -> list[Clip]:
    """Decode every clip of `folder` (`list_clip_files`) at `resolution` (resize + center crop). With
    `class_folders` a clip's class is its folder and its caption the folder name unless a sidecar says more.
    With `min_frames` = 1 (a stage's image part) the folder's image files are single-frame clips too."""
    folder = Path(folder)
    files = list_clip_files(folder, class_folders, images=min_frames == 1)
    if not files:
        hint = ("sub-folders of videos, one per class (data.class_folders=true)" if class_folders else
                f".mp4 clips; generate demo clips with `python -m data_pipeline.synth --out {folder} --clips 24`")
        raise FileNotFoundError(f"{folder}: no clips found; expected {hint}")
    clips = []
    for path, class_id, class_name in tqdm(files, desc=f"decoding {folder}", unit="clip", disable=not progress):
        frames = read_video(path, size=tuple(resolution))
        if len(frames) < min_frames:
            raise ValueError(f"{path}: has {len(frames)} frames, training needs at least {min_frames}")
        caption, cls = read_sidecar(path)
        clips.append(Clip(path, frames, caption or class_name or "", cls if class_id is None else class_id))
    return clips


def split_heldout(items: list, heldout: int, source: object = "clips") -> tuple[list, list]:
    """(training items, held-out items): the last `heldout` (of a name-sorted list) are held out for evaluation
    (`data.heldout_clips`); every user of the split (tokenizer and VideoAR training, the demo) goes through here."""
    if len(items) <= heldout:
        raise ValueError(f"{source}: {len(items)} clips, need more than data.heldout_clips={heldout}")
    return items[:-heldout], items[-heldout:]


def to_model_input(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) or (T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    x = torch.as_tensor(frames)
    if x.dim() == 4:
        x = x.unsqueeze(0)
    return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def to_uint8_frames(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3)."""
    return x.detach().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def random_windows(clips: list[Clip], frames: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A batch of random `frames`-long windows (random clip, random start): float (B, 3, T, H, W)."""
    out = []
    for _ in range(batch):
        clip = clips[int(torch.randint(len(clips), (1,), generator=generator))]
        start = int(torch.randint(len(clip.frames) - frames + 1, (1,), generator=generator))
        out.append(clip.frames[start:start + frames])
    return to_model_input(np.stack(out))
