"""Pre-tokenized WebDataset shards (DESIGN §5): standard tars, one sample per clip.

Members of sample `key` (no dots in keys): `key.latent.npy` (float16 (T', d, h, w) continuous encoder output),
`key.text.npy` (float16 token states) or `key.cls` (class id), `key.txt` (caption), `key.json` (source, start
frame, fps, sizes, tokenizer hash). Written with webdataset's TarWriter, so `webdataset.WebDataset` reads them;
each shard's record also lists every sample's byte range, so a loader can fetch one sample with a ranged read.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass, field

import numpy as np
import webdataset as wds

from data_pipeline.object_store import Store


@dataclass
class ShardRecord:
    name: str  # key in the store, e.g. "32x32x5/shard-000003.tar"
    samples: int
    bytes: int
    sha256: str
    offsets: list[list] = field(default_factory=list)  # [sample key, start, end) per sample

    def to_dict(self) -> dict:
        return asdict(self)


def sample_dict(key: str, latent: np.ndarray, caption: str, meta: dict, text: np.ndarray | None = None,
                cls: int | None = None) -> dict:
    if "." in key:
        raise ValueError(f"sample keys may not contain dots: {key!r}")
    out = {"__key__": key, "latent.npy": latent.astype(np.float16), "txt": caption, "json": meta}
    if text is not None:
        out["text.npy"] = text.astype(np.float16)
    if cls is not None:
        out["cls"] = int(cls)
    return out


def build_shard(samples: list[dict]) -> tuple[bytes, list[list]]:
    """Tar bytes and each sample's [key, start, end) byte range (headers included, 512-byte aligned)."""
    buf = io.BytesIO()
    with wds.TarWriter(buf) as writer:
        for s in samples:
            writer.write(s)
    data = buf.getvalue()
    ranges: dict[str, list] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            key = m.name.split(".", 1)[0]
            end = m.offset_data + (m.size + 511) // 512 * 512
            if key in ranges:
                ranges[key][2] = end
            else:
                ranges[key] = [key, m.offset, end]
    return data, [ranges[s["__key__"]] for s in samples]


def write_tar_shard(store: Store, name: str, samples: list[dict]) -> ShardRecord:
    data, offsets = build_shard(samples)
    store.write(name, data)
    return ShardRecord(name, len(samples), len(data), hashlib.sha256(data).hexdigest(), offsets)


def decode_members(data: bytes) -> dict:
    """Decode one sample's tar members (a byte range of a shard) into arrays and strings."""
    out: dict = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            raw = tf.extractfile(m).read()
            out["__key__"] = key
            if ext.endswith("npy"):
                out[ext] = np.load(io.BytesIO(raw), allow_pickle=False)
            elif ext == "json":
                out[ext] = json.loads(raw)
            elif ext == "cls":
                out[ext] = int(raw)
            else:
                out[ext] = raw.decode("utf-8")
    return out
