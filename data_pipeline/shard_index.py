"""Per-shard sample indexes: the manifest lists each shard with its sample count and the name of its index
file (`<shard>.index.json`: every sample's key and byte range), so a loader holds O(shards) numbers at start-up
and reads a shard's byte ranges only when it first needs a sample of that shard (10^7 samples: a manifest of
~10^4 shard entries instead of 10^7 sample entries). Manifests of format version 1 (byte ranges inline) stay
readable."""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict

import numpy as np

from data_pipeline.object_store import Store

INDEX_FORMAT, INDEX_VERSION, INDEX_SUFFIX = "videoar-shard-index", 1, ".index.json"


def index_name(shard: str) -> str:
    return (shard[:-4] if shard.endswith(".tar") else shard) + INDEX_SUFFIX


def write_index(store: Store, record: dict) -> dict:
    """Write a shard's index (`record`: name, samples, bytes, sha256, offsets) and return its manifest entry
    (everything but the byte ranges, plus the index's name)."""
    name = index_name(record["name"])
    store.write(name, json.dumps({"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "name": record["name"],
                                  "samples": record["samples"], "offsets": record["offsets"]}).encode())
    return {k: v for k, v in record.items() if k != "offsets"} | {"index": name}


class BucketIndex:
    """Sample i of a bucket -> (shard name, start, end, key): the shard from the manifest's cumulative counts, the
    byte range from that shard's index, read on first use and kept in an LRU cache of `cache_shards` shards."""

    def __init__(self, store: Store, shards: list[dict], cache_shards: int = 1024):
        self.store, self.shards, self.cache_shards = store, shards, cache_shards
        self.starts = np.cumsum([0] + [int(s["samples"]) for s in shards])
        self._cache: OrderedDict[int, tuple[list[str], np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.index_reads = 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _offsets(self, j: int) -> tuple[list[str], np.ndarray]:
        with self._lock:
            if j in self._cache:
                self._cache.move_to_end(j)
                return self._cache[j]
        shard = self.shards[j]
        rows = shard["offsets"] if "offsets" in shard else self._read_index(shard)
        entry = ([r[0] for r in rows], np.array([[r[1], r[2]] for r in rows], dtype=np.int64).reshape(-1, 2))
        with self._lock:
            self._cache[j] = entry
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return entry

    def _read_index(self, shard: dict) -> list:
        path = self.store.join(shard["index"])
        try:
            index = json.loads(self.store.read(shard["index"]))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: the shard index the manifest names is missing") from None
        self.index_reads += 1
        if index.get("format") != INDEX_FORMAT or index.get("name") != shard["name"] or \
                len(index.get("offsets", ())) != shard["samples"]:
            raise ValueError(f"{path}: not the index of {shard['name']} with {shard['samples']} samples")
        return index["offsets"]

    def locate(self, i: int) -> tuple[str, int, int, str]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        j = bisect.bisect_right(self.starts, i) - 1
        keys, ranges = self._offsets(j)
        pos = i - int(self.starts[j])
        return self.shards[j]["name"], int(ranges[pos, 0]), int(ranges[pos, 1]), keys[pos]
