"""Streaming loader over preprocessed shards (local or S3) or cached latent sets, exactly resumable (DESIGN §5).

The sample order is `data_pipeline.order`: a seeded permutation per epoch over the manifest's samples, the
global batch of a step a fixed slice of it, each data-parallel rank its strided part. The loader's state is
the number of samples consumed, so a run resumes exactly even when the number of ranks changes. Each rank
fetches only its own samples, one ranged read per sample (its byte range from the shard's index file, read once
per shard: `data_pipeline/shard_index.py`), with a pool of threads and the next batch prefetched.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_pipeline.object_store import open_store
from data_pipeline.order import global_batch, rank_slice
from data_pipeline.preprocess import FORMAT, FORMAT_VERSION, MANIFEST
from data_pipeline.shard_index import BucketIndex
from data_pipeline.shards import decode_members

READABLE_VERSIONS = (1, 2)  # 1: byte ranges inline in the manifest


class ShardSet:
    """One bucket's samples, indexable like `LatentSet` (`len`, `batch(indices)`), fetched on demand."""

    def __init__(self, url: str, bucket: str, endpoint_url: str | None = None, workers: int = 4):
        self.store = open_store(url, endpoint_url)
        try:
            manifest = json.loads(self.store.read(MANIFEST))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.store.join(MANIFEST)}: no manifest; run `python -m data_pipeline."
                                    f"preprocess` first (the manifest is written last, when shards are complete)") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{self.store.join(MANIFEST)}: expected {FORMAT} v{FORMAT_VERSION} (or v1), found "
                             f"{manifest.get('format')} v{manifest.get('format_version')}")
        if bucket not in manifest["buckets"]:
            raise ValueError(f"{self.store.join(MANIFEST)}: no bucket {bucket}; it has {sorted(manifest['buckets'])}")
        self.manifest, self.bucket = manifest, bucket
        self.index = BucketIndex(self.store, manifest["buckets"][bucket]["shards"])  # byte ranges read lazily
        if not len(self.index):
            raise ValueError(f"{self.store.join(MANIFEST)}: bucket {bucket} has no samples")
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-loader")
        self._prefetched: dict[int, Future] = {}
        self.bytes_read = 0

    def __len__(self) -> int:
        return len(self.index)

    def key(self, i: int) -> str:
        return self.index.locate(i)[3]

    def fetch(self, i: int) -> dict:
        name, start, end, key = self.index.locate(i)
        data = self.store.read(name, start, end)
        self.bytes_read += len(data)
        sample = decode_members(data)
        if sample.get("__key__") != key:
            raise ValueError(f"{self.store.join(name)}: bytes [{start}, {end}) hold {sample.get('__key__')!r}, "
                             f"the manifest says {key!r}")
        return sample

    def prefetch(self, indices: list[int]) -> None:
        for i in indices:
            if i not in self._prefetched:
                self._prefetched[i] = self.pool.submit(self.fetch, i)

    def samples(self, indices: list[int]) -> list[dict]:
        """Samples in order; an index may repeat (a global batch that crosses an epoch boundary)."""
        self.prefetch(indices)
        out = [self._prefetched[i].result() for i in indices]
        for i in set(indices):
            self._prefetched.pop(i, None)
        return out

    def texts(self, indices: list[int]) -> list[str]:
        """Captions of samples (their `.txt` member; "" without one)."""
        return [s.get("txt", "") for s in self.samples(indices)]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents float32 (B, T', d, h, w), condition: text states float32 (B, P, D) or class ids (B,))."""
        samples = self.samples(indices)
        latents = torch.from_numpy(np.stack([s["latent.npy"] for s in samples])).float()
        if "text.npy" in samples[0]:
            cond = torch.from_numpy(np.stack([s["text.npy"] for s in samples])).float()
        elif "cls" in samples[0]:
            cond = torch.tensor([s["cls"] for s in samples], dtype=torch.long)
        else:
            raise ValueError(f"{self.store.url}: samples carry neither text states nor class ids. For "
                             "videoar.cond=class, preprocess inputs with a `<stem>.json` sidecar holding an integer "
                             "\"class\"; for videoar.cond=text, preprocess with that config (text states are stored)")
        return latents, cond

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def rank_samples(num_samples: int, seed: int, consumed: int, global_size: int, rank: int, world: int) -> list[int]:
    """Indices this data-parallel rank reads for the step that starts after `consumed` samples."""
    return rank_slice(global_batch(num_samples, seed, consumed, global_size), rank, world)


@dataclass
class LoadedBatch:
    latents: torch.Tensor  # this rank's samples of the step's global batch
    cond: torch.Tensor
    positions: list[int]  # their positions in the global batch (what seeds each sample's random stream)
    keys: list[str]  # their sample keys (the ledger)


class StreamingLoader:
    """The training data and its position: per data stream (a curriculum stage, or each part of a stage that mixes
    images and clips), the samples consumed of that stream's dataset (a `ShardSet` or a `LatentSet`).
    `next_batch` returns this data-parallel rank's part of the step's global batch of a stream and prefetches the
    next one; `state_dict` is the position, so a resume continues exactly, under any dp size."""

    def __init__(self, stream_names: list[str], seed: int, dp_rank: int, dp: int):
        self.stream_names, self.seed, self.dp_rank, self.dp = list(stream_names), seed, dp_rank, dp
        self.consumed = [0] * len(stream_names)  # samples consumed per stream
        self.datasets: dict[int, Any] = {}

    def set_stream(self, index: int, dataset) -> None:
        self.datasets[index] = dataset

    def drop_streams(self, keep: set[int]) -> None:
        """Forget the datasets of streams not in `keep` (a finished stage's data)."""
        self.datasets = {i: d for i, d in self.datasets.items() if i in keep}

    def next_batch(self, stream: int, size: int, offset: int = 0) -> LoadedBatch:
        """This rank's part of the next `size` samples of `stream`; their positions in the step's global batch
        start at `offset` (the parts of a joint stage take consecutive positions)."""
        data, done = self.datasets[stream], self.consumed[stream]
        indices = global_batch(len(data), self.seed, done, size)
        positions = rank_slice(list(range(size)), self.dp_rank, self.dp)
        latents, cond = data.batch([indices[j] for j in positions])
        if hasattr(data, "prefetch"):  # the next step's samples load while this one trains
            upcoming = global_batch(len(data), self.seed, done + size, size)
            data.prefetch([upcoming[j] for j in positions])
        self.consumed[stream] += size
        return LoadedBatch(latents, cond, [offset + j for j in positions], [data.key(indices[j]) for j in positions])

    def state_dict(self) -> dict[str, Any]:
        return {"stages": list(self.stream_names), "consumed": list(self.consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["stages"]) != self.stream_names:
            raise ValueError(f"checkpoint curriculum data streams {list(state['stages'])} differ from the config's "
                             f"{self.stream_names}")
        self.consumed = [int(c) for c in state["consumed"]]
