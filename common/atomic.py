"""Where bytes are written. Every write that others read is atomic: a temp name in the same folder, then rename.

Object storage (s3://) writes are in `data_pipeline.object_store`; this module is for local files.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that needs a file name (a muxer, PIL); it is renamed onto
    `path` when the block succeeds and removed otherwise. The temp name keeps the suffix, so writers that pick
    the format from the extension still work."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the complete new one, never a partial one."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # e.g. a full disk: name the file (a failed write() names none); the temp is removed
            raise OSError(e.errno, f"{e.strerror} (writing {len(data)} bytes)", str(path)) from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
