"""Pre-encoded training samples for VideoAR: continuous tokenizer latents of fixed-length clip windows plus
their condition (text-encoder token states or class ids), held in memory and cached as one safetensors file.

Latents are the *continuous* encoder output (B, T', d, h, w) in float16, so Cross-Frame Error Correction can
requantize them on the fly. This is the local path for one machine; the sharded WebDataset pipeline
(`data_pipeline` shards on object storage) replaces it at scale.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from data_pipeline.clips import Clip, to_model_input
from common.atomic import atomic_write_bytes

log = logging.getLogger(__name__)
FORMAT = "videoar-latents"
FORMAT_VERSION = "1"


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, T', d, h, w) float16
    cond: torch.Tensor  # (N, P, D) float16 text states, or (N,) int64 class ids
    captions: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def key(self, i: int) -> str:
        return f"window-{i:06d}"

    def texts(self, indices: list[int]) -> list[str]:
        """Captions of samples (the same method as ShardSet's)."""
        return [self.captions[i] for i in indices]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(indices, dtype=torch.long)
        cond = self.cond[idx]
        return self.latents[idx].float(), (cond.float() if cond.is_floating_point() else cond)


def clip_windows(clips: list[Clip], frames: int) -> list[tuple[int, int]]:
    """(clip index, start frame) of non-overlapping `frames`-long windows of every clip."""
    return [(i, s) for i, c in enumerate(clips) for s in range(0, len(c.frames) - frames + 1, frames)]


def class_ids(captions: list[str], num_classes: int, labels: list[int | None],
              vocabulary: list[str] | None = None) -> torch.Tensor:
    """A clip's class: its sidecar's integer "class" field, else the rank of its caption among the distinct
    captions (sorted) of `vocabulary` (pass the whole folder's, `clips.caption_vocabulary`, so that training,
    held-out and image samples agree), or of `captions` themselves."""
    ranks = {c: i for i, c in enumerate(sorted(set(captions if vocabulary is None else vocabulary)))}
    missing = sorted(set(captions) - set(ranks))
    if missing:
        raise ValueError(f"captions {missing[:3]} are not in the class vocabulary of {len(ranks)} captions")
    ids = [lab if lab is not None else ranks[c] for c, lab in zip(captions, labels)]
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"class ids {sorted(set(bad))[:5]} fall outside videoar.num_classes={num_classes}")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def encode_latent_set(tokenizer, clips: list[Clip], frames: int, cond_kind: str, text_encoder=None,
                      num_classes: int = 0, batch_size: int = 4, progress: bool = True,
                      vocabulary: list[str] | None = None) -> LatentSet:
    windows = clip_windows(clips, frames)
    if not windows:
        raise ValueError(f"no clip has {frames} frames; clips: {[str(c.path) for c in clips[:3]]} ...")
    latents = []
    for i in tqdm(range(0, len(windows), batch_size), desc=f"encoding {frames}-frame windows", unit="batch",
                  disable=not progress):
        x = to_model_input(np.stack([clips[c].frames[s:s + frames] for c, s in windows[i:i + batch_size]]))
        z = tokenizer.encode_latent(x.to(next(tokenizer.parameters()).device))
        latents.append(z.transpose(1, 2).half().cpu())  # (B, T', d, h, w)
    captions = [clips[c].caption for c, _ in windows]
    if cond_kind == "text":
        cond = text_encoder.encode(captions).half()
    else:
        cond = class_ids(captions, num_classes, [clips[c].class_id for c, _ in windows], vocabulary)
    return LatentSet(torch.cat(latents), cond, captions)


def save_latent_set(ds: LatentSet, path: str | Path, key: str) -> None:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "captions": json.dumps(ds.captions)}
    atomic_write_bytes(path, save({"latents": ds.latents.contiguous(), "cond": ds.cond.contiguous()}, metadata=meta))


def load_latent_set(path: str | Path, key: str) -> LatentSet | None:
    """The cached set if `path` holds one built for `key` (tokenizer + data settings), else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION or meta.get("key") != key:
                log.info("%s: built for other settings, re-encoding", path)
                return None
            return LatentSet(f.get_tensor("latents"), f.get_tensor("cond"), json.loads(meta["captions"]))
    except Exception as e:  # noqa: BLE001 - a cache: any unreadable file is rebuilt, never trusted
        log.warning("%s: unreadable latent cache (%s), re-encoding", path, e)
        return None


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
