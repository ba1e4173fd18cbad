"""DCP's file writer, hashing its bytes as they are written and flushing them to disk behind the writer.

`DigestingWriter` is `dcp.FileSystemWriter` with a file system (`FileSystemBase.create_stream`, DCP's hook for
where bytes go) whose streams
- hash every byte written once (large writes on a second core, concurrently with their copy into the page
  cache, by a thread the stream starts, so it inherits the writer's priority): one xxh3-128 per segment between
  two `tell()` calls. DCP asks `tell()` before and after each saved item (its `offset` and `length` in
  `.metadata`), so each item is one segment; after the write every item DCP reports is checked against the
  segment at its offset (same start, same length), so the digests are exactly those a re-read of the file gives
  (`dcp_format.chunk_digests`), and the file is never read back. The file's digest derives from its segments'
  (`digests.items_digest`: the segments tile the file);
- fdatasync the file every 20 ms from a thread once it holds `WRITE_BEHIND_BYTES` (`common.atomic.
  flushing_behind`), so the disk writes while DCP serializes and DCP's own closing fsync (kept: `sync_files`)
  waits only for the tail. DCP closes the stream inside `create_stream`'s block, so `close()` stops the thread
  before the descriptor goes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from common.atomic import flushing_behind
from parallel.digests import items_digest, new_hasher

log = logging.getLogger(__name__)
WRITE_BEHIND_BYTES = 8 << 20  # smaller files (`.metadata`, a rank's tiny data file) need no flusher thread
FLUSH_INTERVAL_S = 0.02  # fdatasync period of the write-behind thread
SLICE_BYTES = 256 << 10  # hashed, then copied, while in the CPU cache
PARALLEL_HASH_BYTES = 1 << 20  # writes this large (91% of a checkpoint's bytes come in 2-4 MB writes) are hashed
#                                by a thread of the stream's while the writer copies them (xxhash frees the GIL)
Digests = dict[str, tuple[str, dict[str, str]]]  # {file name: (file digest, {byte offset: chunk digest})}


class DigestingStream(io.RawIOBase):
    """A write-only file that hashes what passes through, per segment between `tell()`s, and starts flushing
    behind the writer once it is large."""

    def __init__(self, f: io.BufferedWriter):
        super().__init__()
        self.f, self.chunk = f, new_hasher()
        self.pos = self.start = 0
        self.segments: dict[int, tuple[int, str]] = {}  # start offset -> (length, digest)
        self.behind = contextlib.ExitStack()
        self.flushing = False  # the write-behind thread started
        self.hasher: ThreadPoolExecutor | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= PARALLEL_HASH_BYTES:  # a tensor's bytes: hashed on a second core while they are copied
            if self.hasher is None:  # started by (so as nice as) the thread that writes
                self.hasher = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash")
            hashed = self.hasher.submit(self.chunk.update, view)
            try:
                self.f.write(view)
            finally:
                hashed.result()  # the caller may reuse `data` once write() returns
        else:
            for i in range(0, view.nbytes, SLICE_BYTES):  # the digest and the copy read a slice while it is cached
                piece = view[i:i + SLICE_BYTES]
                self.chunk.update(piece)
                self.f.write(piece)
        self.pos += view.nbytes
        if not self.flushing and self.pos >= WRITE_BEHIND_BYTES:
            self.behind.enter_context(flushing_behind(self.f, FLUSH_INTERVAL_S))
            self.flushing = True
        return view.nbytes

    def tell(self) -> int:
        """Also a segment boundary: the bytes since the previous `tell()` are one segment."""
        if self.pos > self.start:
            self.segments[self.start] = (self.pos - self.start, self.chunk.hexdigest())
            self.chunk.reset()
        self.start = self.pos
        return self.pos

    def flush(self) -> None:
        if not self.f.closed:
            self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.tell()  # trailing bytes form the last segment
            self.behind.close()  # the flusher stops before the descriptor is closed
            if self.hasher is not None:
                self.hasher.shutdown()
            self.f.close()
        finally:
            super().close()


class DigestingFileSystem(FileSystem):
    """DCP's local file system whose write streams are `DigestingStream`s; `streams` keeps each by file name."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, DigestingStream] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = DigestingStream(open(path, mode))  # closed below (or by DCP, earlier)
        self.streams[Path(path).name] = stream
        try:
            yield stream
        finally:
            stream.close()


class DigestingWriter(dcp.FileSystemWriter):
    """`dcp.FileSystemWriter` (one file per rank, fsynced) through a `DigestingFileSystem`; after `dcp.save`,
    `digests` holds this rank's data files' digests, or None when DCP's items did not line up with the
    recorded segments (a DCP that writes differently: the caller then re-reads the files)."""

    def __init__(self, path: str | Path, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = DigestingFileSystem()
        self.digests: Digests | None = None

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        self.digests = item_digests(self.fs.streams, [r.storage_data for r in future.value()])
        return future


def item_digests(streams: dict[str, DigestingStream], infos: list) -> Digests | None:
    """{file name: (file digest, {offset: digest of each segment})} of the data files in `streams` for the saved
    items `infos` (DCP's `_StorageInfo`s: file, offset, length); None (with a warning) unless each item is exactly
    a segment of a closed stream."""
    closed = {name: s for name, s in streams.items() if s.closed}
    for info in infos:
        stream = closed.get(info.relative_path)
        segment = stream.segments.get(info.offset) if stream is not None else None
        if segment is None or segment[0] != info.length:
            log.warning("DCP item %s bytes %d+%d is not one written segment (%s); re-reading the files to hash "
                        "them", info.relative_path, info.offset, info.length, segment)
            return None
    out = {}
    for name, s in closed.items():
        chunks = {str(offset): digest for offset, (_, digest) in s.segments.items()}
        out[name] = items_digest(s.pos, chunks), chunks
    return out
