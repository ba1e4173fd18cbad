"""One small interface over a local directory (the embedded default) and `s3://bucket/prefix` (boto3).

Keys are '/'-separated paths relative to the store's root. Writes are atomic for readers: local files go to a
temp name and are renamed; an S3 PUT is atomic by itself (an object becomes visible whole, or not at all, and
botocore sends a checksum the server verifies), so objects are put straight to their key: no temp object, nothing
left behind when a write fails. The manifest, written last, is the commit point. S3 endpoint and credentials come from
`AWS_ENDPOINT_URL` / `AWS_*` environment variables or the standard AWS config files (never logged or stored).
Retries are botocore's "standard" mode (connection errors, timeouts, 5xx, throttling; exponential backoff with
jitter starting at 50 ms, at most 20 s per wait). Its budget is `AWS_MAX_ATTEMPTS` (botocore's variable), by default
`MAX_ATTEMPTS`: 15 attempts ride out an endpoint outage of about a minute (the waits add up to ~63 s on average)
before the call fails. botocore does not retry a response body cut off mid-read (it streams after the retry
layer), so `S3Store.read` retries that itself, `BODY_ATTEMPTS` times with backoff.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterator

from common.atomic import atomic_write_bytes

log = logging.getLogger(__name__)
BODY_ATTEMPTS = 4
MAX_ATTEMPTS = 15  # botocore's default of 3 (waits of ~0.1 s) fails on a restart of the endpoint


class Store:
    url: str

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of `key` (whole object by default)."""
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, size) of every object under `prefix`, sorted by key."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for `key` when the store is local (decoders can open it directly)."""
        return None

    def stale_temporaries(self, min_age_s: float) -> list[str]:
        """Keys of temporary objects older than `min_age_s` (a write killed before its rename, or the temp keys
        of S3 writers before 2026-11-22 that exhausted their retries): never listed, never read, only space."""
        return []

    def clean_temporaries(self, min_age_s: float = 3600.0) -> int:
        """Delete `stale_temporaries`; the age limit leaves a concurrent writer's in-flight temp alone."""
        stale = self.stale_temporaries(min_age_s)
        for key in stale:
            self.delete(key)
        if stale:
            log.info("%s: removed %d stale temporary objects (e.g. %s)", self.url, len(stale), stale[0])
        return len(stale)

    def join(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def read(self, key, start=None, end=None):
        path = self.root / key
        try:
            with path.open("rb") as f:
                if start:
                    f.seek(start)
                return f.read() if end is None else f.read(end - (start or 0))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None

    def write(self, key, data):
        atomic_write_bytes(self.root / key, data)

    def exists(self, key):
        return (self.root / key).is_file()

    def list(self, prefix=""):
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return iter(())
        files = sorted(p for p in (base.rglob("*") if base.is_dir() else [base]) if p.is_file())
        return ((p.relative_to(self.root).as_posix(), p.stat().st_size) for p in files
                if not p.name.startswith("."))

    def delete(self, key):
        (self.root / key).unlink(missing_ok=True)

    def local_path(self, key):
        return self.root / key

    def stale_temporaries(self, min_age_s):
        if not self.root.is_dir():
            return []
        cutoff = time.time() - min_age_s
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob(".*.tmp-*")
                      if p.is_file() and p.stat().st_mtime < cutoff)


class S3Store(Store):
    def __init__(self, url: str, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url}")
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise ValueError(f"{url}: missing bucket name (s3://bucket/prefix)")
        self.url, self.bucket, self.prefix = url.rstrip("/"), bucket, prefix.strip("/")
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or MAX_ATTEMPTS)
        self.client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
                                   config=Config(retries={"max_attempts": attempts, "mode": "standard"},
                                                 connect_timeout=10))
        self.max_attempts = attempts
        self.client.meta.events.register_first("needs-retry.s3", self._log_failed_attempt)

    def _log_failed_attempt(self, attempts: int = 0, caught_exception=None, response=None, operation=None,
                            **_) -> None:
        """A log line per failed request attempt (botocore retries silently); returns None: the retry policy
        registered after this decides."""
        if caught_exception is not None:
            what = type(caught_exception).__name__
        elif response is not None and response[0].status_code >= 500:
            what = f"HTTP {response[0].status_code}"
        else:
            return None
        name = getattr(operation, "name", "request")
        log.warning("%s: %s attempt %d of %d failed (%s); retrying with backoff", self.url, name, attempts,
                    self.max_attempts, what)
        return None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, key, start=None, end=None):
        kwargs = {}
        if start is not None or end is not None:
            kwargs["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        for attempt in range(BODY_ATTEMPTS):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(f"{self.join(key)}: no such object") from None
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as e:
                if attempt + 1 == BODY_ATTEMPTS:
                    raise
                log.warning("%s: response cut off (%s); retrying", self.join(key), type(e).__name__)
                time.sleep(0.1 * 2**attempt)

    def write(self, key, data):
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key):
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix=""):
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        items = [(o["Key"][strip:], o["Size"]) for page in pages for o in page.get("Contents", [])]
        return iter(sorted(i for i in items if ".tmp-" not in i[0]))  # temp keys of writers before 2026-11-22

    def delete(self, key):
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def stale_temporaries(self, min_age_s):
        full = f"{self.prefix}/" if self.prefix else ""
        strip = len(full)
        cutoff = time.time() - min_age_s
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        return sorted(o["Key"][strip:] for page in pages for o in page.get("Contents", [])
                      if ".tmp-" in o["Key"][strip:] and o["LastModified"].timestamp() < cutoff)


def open_store(url: str | os.PathLike, endpoint_url: str | None = None) -> Store:
    """A store for a local directory or an `s3://bucket/prefix` URL."""
    url = str(url)
    return S3Store(url, endpoint_url) if url.startswith("s3://") else LocalStore(url)
