"""Training checkpoints (DESIGN §6): `step-00001234/` with one shard per rank and `metadata.json` written last.

A step directory is built under a temporary name, each shard is fsynced and hashed, `metadata.json` (format,
step, sha256 per shard, config) is the commit marker, then the directory is renamed into place and `latest` is
updated. Resume picks the newest committed step, verifies every checksum and falls back to the previous step
when one is corrupted. Shards are loaded with `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from data_pipeline.storage import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
FORMAT, FORMAT_VERSION = "videoar-checkpoint", 1
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save_checkpoint(root: str | Path, step: int, shards: dict[str, dict[str, Any]], meta: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write `shards` (file name -> state) as one committed step; keep the newest `keep_last` steps."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sums = {}
    for name, state in shards.items():
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        atomic_write_bytes(tmp / name, data)
        sums[name] = hashlib.sha256(data).hexdigest()
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "shards": sums, **meta}
    atomic_write_text(tmp / "metadata.json", json.dumps(record, indent=1, sort_keys=True))  # commit marker
    if final.exists():  # a re-save of the same step replaces it
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in committed_steps(root)[:-keep_last]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)
    return final


def committed_steps(root: str | Path) -> list[int]:
    """Steps with a metadata.json (committed), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "metadata.json").is_file()]
    return sorted(steps)


def read_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(metadata, shards) of one step directory, verified; raises ValueError naming the bad file."""
    directory = Path(directory)
    meta_path = directory / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: expected {FORMAT} v{FORMAT_VERSION}, found "
                         f"{meta.get('format')} v{meta.get('format_version')}")
    shards = {}
    for name, digest in meta["shards"].items():
        path = directory / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: missing checkpoint shard ({e})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{path}: checksum mismatch (corrupted or partially written)")
        shards[name] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return meta, shards


def load_latest(root: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """The newest committed step that verifies, falling back to older ones; None when there is none."""
    for step in reversed(committed_steps(root)):
        try:
            return read_checkpoint(step_dir(root, step))
        except ValueError as e:
            log.warning("skipping checkpoint step %d: %s", step, e)
    return None
