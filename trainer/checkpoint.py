"""Training checkpoints (DESIGN §6): `step-00001234/` with one shard per rank and `metadata.json` written last.

A step directory is built under a temporary name, each rank fsyncs and hashes its own shard, `metadata.json`
(format, step, sha256 per shard, config) is the commit marker, then the directory is renamed into place and `latest` is
updated. Resume picks the newest committed step, verifies every checksum and falls back to the previous step
when one is corrupted. Shards are loaded with `torch.load(weights_only=True)`: no pickled code runs.

Async save (`AsyncSaver`): the state is copied to CPU memory (the only stall), and a background thread writes
the shard; in a multi-rank job rank 0's thread waits until every rank's shard exists under its final name (each
is renamed into place only after fsync) and then commits. One save is in flight at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from data_pipeline.storage import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
FORMAT, FORMAT_VERSION = "videoar-checkpoint", 2
STEP_DIR = re.compile(r"^step-(\d{8})$")
DIGEST_SUFFIX = ".sha256"  # a rank's digest of its shard, beside it until the commit


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """A fresh temporary directory for step `step` (one process calls this; the others wait)."""
    tmp = Path(root) / f".tmp-{step_dir(root, step).name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_shard(tmp: Path, name: str, state: dict[str, Any]) -> str:
    """One shard (e.g. `rank-00003.pt`), fsynced; every rank writes its own, in parallel, and hashes it while
    the bytes go to disk. The digest goes to `<name>.sha256` after the shard is durable, so its presence means
    the shard is complete, and the commit need not read the shard back. Returns the digest."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    digest: list[str] = []
    hasher = threading.Thread(target=lambda: digest.append(hashlib.sha256(data).hexdigest()))  # releases the GIL
    hasher.start()
    atomic_write_bytes(tmp / name, data)
    hasher.join()
    atomic_write_text(tmp / (name + DIGEST_SUFFIX), digest[0])
    return digest[0]


def commit_checkpoint(root: str | Path, step: int, tmp: Path, meta: dict[str, Any], keep_last: int = 3) -> Path:
    """After every shard is on disk: hash them, write metadata.json (the commit marker), rename into place,
    point `latest` at it and drop all but the newest `keep_last` steps."""
    root, final = Path(root), step_dir(root, step)
    sums = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file() and not f.name.endswith(DIGEST_SUFFIX):
            digest = f.with_name(f.name + DIGEST_SUFFIX)
            sums[str(f.relative_to(tmp))] = digest.read_text().strip() if digest.is_file() else _sha256(f)
    for f in tmp.rglob("*" + DIGEST_SUFFIX):
        f.unlink()
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "shards": sums, **meta}
    atomic_write_text(tmp / "metadata.json", json.dumps(record, indent=1, sort_keys=True))
    if final.exists():  # a re-save of the same step replaces it
        _discard(final)
    tmp.rename(final)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in committed_steps(root)[:-keep_last]:
        _discard(step_dir(root, old))
    for stale in root.glob(".tmp-step-*"):  # left by a save that died (one save is in flight at a time)
        _discard(stale)
    threading.Thread(target=_empty_trash, args=(root,), name="checkpoint-trash", daemon=True).start()
    return final


def _discard(directory: Path) -> None:
    """Uncommit a step at once (a rename); its bytes are deleted off the critical path by `_empty_trash`."""
    directory.rename(directory.with_name(f".trash-{directory.name}-{time.time_ns()}"))


def _empty_trash(root: Path) -> None:
    for trash in root.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, shards: dict[str, dict[str, Any]], meta: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write `shards` (file name -> state) as one committed step from a single process."""
    tmp = begin_checkpoint(root, step)
    for name, state in shards.items():
        write_shard(tmp, name, state)
    return commit_checkpoint(root, step, tmp, meta, keep_last)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def committed_steps(root: str | Path) -> list[int]:
    """Steps with a metadata.json (committed), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "metadata.json").is_file()]
    return sorted(steps)


Wanted = set[str] | Callable[[dict[str, Any]], set[str]] | None


def read_checkpoint(directory: str | Path, wanted: Wanted = None
                    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(metadata, top-level .pt shards) of one step directory, every file verified against its checksum;
    `wanted` (a set, or a function of the metadata, e.g. of the layout that saved it) limits which shards are
    loaded. Each file is read once. Raises ValueError naming the bad file."""
    directory = Path(directory)
    meta_path = directory / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: expected {FORMAT} v{FORMAT_VERSION}, found "
                         f"{meta.get('format')} v{meta.get('format_version')}")
    if callable(wanted):
        wanted = wanted(meta)
    shards = {}
    for name, digest in meta["shards"].items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path}: missing checkpoint shard")
        load = path.suffix == ".pt" and path.parent == directory and (wanted is None or name in wanted)
        data = path.read_bytes() if load else None
        if (hashlib.sha256(data).hexdigest() if load else _sha256(path)) != digest:
            raise ValueError(f"{path}: checksum mismatch (corrupted or partially written)")
        if load:
            shards[name] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return meta, shards


def load_latest(root: str | Path, wanted: Wanted = None
                ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """The newest committed step that verifies, falling back to older ones (with a warning saying why);
    None when there is none."""
    steps = committed_steps(root)
    for i in range(len(steps) - 1, -1, -1):
        try:
            return read_checkpoint(step_dir(root, steps[i]), wanted)
        except ValueError as e:
            fallback = f"falling back to step {steps[i - 1]}" if i else "no older checkpoint: starting afresh"
            log.warning("checkpoint step %d is unusable: %s; %s", steps[i], e, fallback)
    return None


def snapshot(state: Any) -> Any:
    """A copy of a (nested) state dict whose tensors are detached CPU copies: training may change the
    originals while the copy is written."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


def wait_for_shards(tmp: Path, names: list[str], timeout_s: float) -> None:
    """Block until every named shard is complete in `tmp` (its digest file, written last by its rank, exists)."""
    deadline = time.monotonic() + timeout_s
    while missing := [n for n in names if not (tmp / (n + DIGEST_SUFFIX)).is_file()]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tmp}: shards {missing[:4]} not written within {timeout_s:.0f} s; their ranks "
                               "probably died, so this checkpoint stays uncommitted")
        time.sleep(0.02)


class AsyncSaver:
    """Runs one checkpoint write at a time in a background thread; `wait()` joins it and re-raises its error."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None

    def submit(self, fn: Callable[[], Any]) -> None:
        self.wait()

        def run() -> None:
            try:
                self._result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> Any:
        """The finished save's result (e.g. the committed path; None on ranks that do not commit)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"asynchronous checkpoint save failed: {error}") from error
        result, self._result = self._result, None
        return result
