"""Digests of checkpoint files: xxh3-128 (the `xxhash` package, ~10 GB/s, computed while the bytes are written)
for new checkpoints; sha256 (~1 GB/s, slower than the disk) verified for checkpoints written before 2026-12-03.
A checkpoint's metadata names its algorithm (`digest`; none = sha256). These detect corruption and partial
writes, not tampering: a file is trusted only as far as `weights_only` loading (parallel/safe_load.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

DIGEST = "xxh3_128"  # what new checkpoints use
# How a DCP data file's digest (metadata `shards`) derives from its chunks' (metadata `items`), named in the
# metadata as `items_digest`: the file is hashed once, chunk by chunk, as it is written. Checkpoints without the
# field hashed DCP data files whole (a second pass); no reader verifies those whole-file digests (each rank
# verifies the chunks it reads), so both read alike.
ITEMS_DIGEST = "xxh3_128 of the file size and each chunk's offset and digest"
LEGACY = "sha256"  # what a checkpoint without a `digest` field used
ALGORITHMS = (DIGEST, LEGACY)


def new_hasher(algorithm: str = DIGEST) -> Any:
    if algorithm == DIGEST:
        return xxhash.xxh3_128()
    if algorithm == LEGACY:
        return hashlib.sha256()
    raise ValueError(f"unknown checkpoint digest {algorithm!r}; this version reads {list(ALGORITHMS)}")


def bytes_digest(data: bytes | memoryview, algorithm: str = DIGEST) -> str:
    h = new_hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def items_digest(size: int, chunks: dict[str, str]) -> str:
    """A file's digest from the digests of chunks that tile it ({byte offset: digest}; `ITEMS_DIGEST`)."""
    lines = [str(size)] + [f"{o} {chunks[o]}" for o in sorted(chunks, key=int)]
    return bytes_digest("\n".join(lines).encode())


def file_digest(path: str | Path, algorithm: str = DIGEST) -> str:
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class HashingWriter:
    """A write-only file object that hashes what passes through (torch.save streams into it: the shard is
    serialized, hashed and written in one pass, with no in-memory copy of it)."""

    def __init__(self, f: BinaryIO, algorithm: str = DIGEST):
        self.f, self.hasher = f, new_hasher(algorithm)
        self.error: OSError | None = None  # torch.save turns a failed write into a RuntimeError: kept here

    def write(self, data) -> int:
        self.hasher.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()
