"""An encoder worker of the preprocessing job: a Ray actor (one GPU each where the cluster has GPUs) that decodes
its inputs, encodes their clips with the frozen tokenizer (and text encoder), writes its own shards with
webdataset's TarWriter and the per-input commit records (`preprocess_commit`), and returns only small metadata
to the driver: the outcome of each committed input and the record of each shard written (name, counts, bytes,
sha256, every sample's byte range)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipeline.clips import parse_sidecar, to_model_input
from data_pipeline.object_store import Store, open_store
from data_pipeline.preprocess_commit import Bucket, commit_input, shard_name, shard_record_key
from data_pipeline.shard_index import write_index
from data_pipeline.shards import sample_dict, write_tar_shard
from data_pipeline.tokenizer_ckpt import load_tokenizer
from data_pipeline.video_io import VideoDecodeError, probe_video, read_video
from models.text_encoder import TextEncoder


@dataclass(frozen=True)
class WorkerJob:
    """What every encoder worker of one run is given."""
    src: str  # input store URL
    out: str  # output store URL
    endpoint: str | None
    buckets: tuple[Bucket, ...]
    tokenizer_ckpt: str
    tokenizer_hash: str
    cond: str
    text_encoder: str
    text_len: int
    stride: int
    max_clips: int
    batch_size: int
    shard_bytes: int


def read_sidecar(store: Store, key: str) -> tuple[str, int | None]:
    """Caption (and optional class id) from the `<stem>.json` or `<stem>.txt` next to `key` in the store."""
    stem = key.rsplit(".", 1)[0]
    meta, txt = stem + ".json", stem + ".txt"
    return parse_sidecar(meta, store.read(meta) if store.exists(meta) else None,
                         store.read(txt) if store.exists(txt) else None, strict=False)


def decode_input(store: Store, key: str, size: int, buckets, stride: int, max_clips: int) -> dict:
    """Probe, filter and cut one input into uint8 clips per bucket, or say why it is quarantined."""
    if size == 0:
        return {"key": key, "quarantine": "empty file (0 bytes)"}
    path, tmp = store.local_path(key), None
    try:
        if path is None:  # object storage: a local copy for the decoder
            tmp = tempfile.NamedTemporaryFile(suffix=Path(key).suffix, delete=False)
            tmp.write(store.read(key))
            tmp.close()
            path = Path(tmp.name)
        try:
            info = probe_video(path)
        except VideoDecodeError as e:
            return {"key": key, "quarantine": str(e).replace(str(path), key)}
        clips, reasons = {}, []
        for b in buckets:
            if info.height < b.height or info.width < b.width:
                reasons.append(f"too small for {b.name}: {info.width}x{info.height}")
                continue
            try:
                frames = read_video(path, size=(b.height, b.width))
            except VideoDecodeError as e:
                return {"key": key, "quarantine": str(e).replace(str(path), key)}
            if len(frames) < b.frames:
                reasons.append(f"too short for {b.name}: {len(frames)} frames")
                continue
            starts = list(range(0, len(frames) - b.frames + 1, stride or b.frames))
            if max_clips:
                starts = starts[:max_clips]
            clips[b.name] = [(s, frames[s:s + b.frames]) for s in starts]
        if not clips:
            return {"key": key, "quarantine": "; ".join(reasons)}
        caption, cls = read_sidecar(store, key)
        return {"key": key, "clips": clips, "caption": caption, "cls": cls, "fps": info.fps}
    finally:
        if tmp is not None:
            os.unlink(tmp.name)


@dataclass
class ShardBuffer:
    """One bucket's samples of a worker not yet in a shard."""
    bucket: Bucket
    samples: list = field(default_factory=list)
    inputs: set = field(default_factory=set)
    size: int = 0


class ShardWorker:
    """The Ray actor: `process` one input at a time (the driver hands each input to an idle worker), `finish` to
    write the last partial shards. Worker `worker` names its shards `shard-w<worker>-<seq>` from `first_seq` on."""

    def __init__(self, job: WorkerJob, worker: int, first_seq: int, threads: int = 1):
        torch.set_num_threads(threads)
        self.job, self.worker, self.seq = job, worker, first_seq
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per GPU actor
        self.tokenizer, _, _ = load_tokenizer(job.tokenizer_ckpt, self.device)
        self.text = TextEncoder(job.text_encoder, job.text_len) if job.cond == "text" else None
        self.src, self.out = open_store(job.src, job.endpoint), open_store(job.out, job.endpoint)
        self.buffers = {b.name: ShardBuffer(b) for b in job.buckets}
        self.open: dict[str, dict] = {}  # input id -> its clips, the buckets it still has buffered, its shards
        self.committed: list[dict] = []  # outcomes and shard records since the last return to the driver
        self.written: list[dict] = []
        self.busy = {"decode": 0.0, "encode": 0.0, "write": 0.0}  # seconds, since the last return

    def node(self) -> str:
        """The address of the node this worker runs on (reported in the summary)."""
        import ray

        return ray.util.get_node_ip_address()

    def process(self, iid: str, key: str, size: int, folder: tuple[int, str] | None = None) -> dict:
        """Decode, encode and buffer input `key` (id `iid`); shards that reach `shard_bytes` are written and the
        inputs they complete committed. `folder`: (class id, name) under data.class_folders."""
        job, t = self.job, time.perf_counter()
        res = decode_input(self.src, key, size, job.buckets, job.stride, job.max_clips)
        t = self._spent("decode", t)
        if "quarantine" in res:
            self._commit({"id": iid, "input": self.src.join(key), "status": "quarantined",
                          "reason": res["quarantine"]})
            return self._report()
        if folder is not None:  # the class is the folder, the caption its name unless a sidecar says
            res.update(cls=folder[0], caption=res["caption"] or folder[1])
        text = self.text.encode([res["caption"]])[0].half().numpy() if self.text is not None else None
        self.open[iid] = {"key": key, "clips": 0, "buckets": set(res["clips"]), "shards": []}
        for bname, clips in res["clips"].items():
            self._buffer(self.buffers[bname], iid, res, clips, self._encode([c for _, c in clips]), text)
            self.open[iid]["clips"] += len(clips)
        t = self._spent("encode", t)
        for buf in self.buffers.values():
            if buf.size >= job.shard_bytes:
                self._flush(buf)
        self._spent("write", t)
        return self._report()

    def finish(self) -> dict:
        """Write every buffered sample (the last, partial shards) and commit the inputs they complete."""
        t = time.perf_counter()
        for buf in self.buffers.values():
            self._flush(buf)
        self._spent("write", t)
        return self._report()

    def _spent(self, what: str, since: float) -> float:
        now = time.perf_counter()
        self.busy[what] += now - since
        return now

    def _encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        latents, bs = [], self.job.batch_size
        with torch.no_grad():
            for i in range(0, len(clips), bs):
                x = to_model_input(np.stack(clips[i:i + bs])).to(self.device)
                latents += list(self.tokenizer.encode_latent(x).transpose(1, 2).half().cpu().numpy())
        return latents

    def _buffer(self, buf: ShardBuffer, iid: str, res: dict, clips: list, latents: list, text) -> None:
        b, source = buf.bucket, self.src.join(res["key"])
        for (start, _), lat in zip(clips, latents):
            meta = {"source": source, "start": start, "fps": res["fps"], "frames": b.frames, "height": b.height,
                    "width": b.width, "latent_shape": list(lat.shape), "tokenizer": self.job.tokenizer_hash}
            buf.samples.append(sample_dict(f"{iid}_{start:06d}", lat, res["caption"], meta, text, res["cls"]))
            buf.size += lat.nbytes + (text.nbytes if text is not None else 0) + 4096
        buf.inputs.add(iid)

    def _flush(self, buf: ShardBuffer) -> None:
        """Shard tar, then its index, then its record (each an atomic write); then the inputs it completes."""
        if not buf.samples:
            return
        name = shard_name(buf.bucket.name, self.worker, self.seq)
        self.seq += 1
        record = write_tar_shard(self.out, name, buf.samples).to_dict()
        index = write_index(self.out, record)["index"]
        rec = {**record, "tokenizer": self.job.tokenizer_hash, "bucket": buf.bucket.name, "index": index,
               "worker": self.worker, "pid": os.getpid(), "inputs": sorted(buf.inputs)}
        self.out.write(shard_record_key(name), json.dumps(rec).encode())
        self.written.append(rec)  # small: counts, checksum, byte ranges (the driver merges them into the manifest)
        for iid in sorted(buf.inputs):
            state = self.open[iid]
            state["buckets"].discard(buf.bucket.name)
            state["shards"].append(name)
            if not state["buckets"]:
                self._commit({"id": iid, "input": self.src.join(state["key"]), "status": "ok",
                              "clips": state["clips"], "shards": state["shards"]})
                del self.open[iid]
        buf.samples, buf.inputs, buf.size = [], set(), 0

    def _commit(self, record: dict) -> None:
        self.committed.append(commit_input(self.out, record))

    def _report(self) -> dict:
        report = {"committed": self.committed, "shards": self.written, "worker": self.worker, "busy": self.busy}
        self.committed, self.written, self.busy = [], [], dict.fromkeys(self.busy, 0.0)
        return report
