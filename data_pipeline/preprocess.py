"""Preprocess videos into pre-tokenized WebDataset shards, orchestrated by Ray (DESIGN §5).

    python -m data_pipeline.preprocess --config configs/demo.yaml [preprocess.input=DIR|s3://...]
        [preprocess.output=DIR|s3://...] [preprocess.ray_address=auto] [data.endpoint_url=http://...]

discover -> probe/filter -> split into clips of each curriculum bucket's frame count -> resize/crop to the
bucket's resolution (Ray tasks) -> tokenizer encoder + text encoder (batched Ray actors) -> shards per bucket
`<output>/<H>x<W>x<F>/shard-000000.tar` -> `manifest.json` (the commit point, written last).

Bad inputs (unreadable, truncated, empty, audio-only, too short, too small) are recorded with the reason in
`quarantine.json`; the job exits non-zero only if nothing usable remains. Progress is committed per input under
`_progress/` right after the shards holding its clips are written, so a re-run (or a run after a crash) skips
committed inputs and never duplicates a sample.

Metrics (clips/s, bytes/s, quarantine counts) go through the trainer's sinks (JSONL, TensorBoard,
Prometheus) to the local directory `<run.dir>/preprocess/` (`preprocess_report.Meter`), whatever the output
store is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import config_arg_parser, config_from_args
from data_pipeline.clips import IMAGE_EXTS, SIDECAR_EXTS, VIDEO_EXTS, folder_classes, parse_sidecar, to_model_input
from data_pipeline.object_store import Store, open_store
from data_pipeline.preprocess_report import Meter, Summary
from data_pipeline.ray_runtime import start_ray
from data_pipeline.shard_index import write_index
from data_pipeline.shards import ShardRecord, sample_dict, write_tar_shard
from data_pipeline.tokenizer_ckpt import WEIGHTS, load_tokenizer
from data_pipeline.video_io import VideoDecodeError, probe_video, read_video
from models.text_encoder import TextEncoder

log = logging.getLogger("preprocess")
MANIFEST, QUARANTINE, PROGRESS = "manifest.json", "quarantine.json", "_progress"
FORMAT, FORMAT_VERSION = "videoar-shards", 2  # 2: byte ranges in per-shard index files
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"


def buckets_of(cfg) -> list[Bucket]:
    """One bucket per shape of every curriculum stage part (the clips, and a joint stage's images: frames = 1)."""
    return sorted({Bucket(p.resolution[0], p.resolution[1], p.frames) for s in cfg.curriculum for p in s.parts()},
                  key=lambda b: b.name)


def media_exts(buckets: list[Bucket]) -> set[str]:
    """Input file types: videos, and image files too when a bucket holds single frames (joint image-video
    stages), which also takes every `preprocess.stride`-th frame (default: every frame) of each video."""
    return VIDEO_EXTS | (IMAGE_EXTS if any(b.frames == 1 for b in buckets) else set())


def input_id(key: str, size: int) -> str:
    return hashlib.sha256(f"{key}\0{size}".encode()).hexdigest()[:16]


def tokenizer_hash(ckpt: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(ckpt) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# -- Ray work ------------------------------------------------------------------------------------------------
def read_sidecar(store: Store, key: str) -> tuple[str, int | None]:
    """Caption (and optional class id) from the `<stem>.json` or `<stem>.txt` next to `key` in the store."""
    stem = key.rsplit(".", 1)[0]
    meta, txt = stem + ".json", stem + ".txt"
    return parse_sidecar(meta, store.read(meta) if store.exists(meta) else None,
                         store.read(txt) if store.exists(txt) else None, strict=False)


def decode_input(in_url: str, endpoint: str | None, key: str, size: int, buckets: list[Bucket], stride: int,
                 max_clips: int) -> dict:
    """Probe, filter and cut one input into uint8 clips per bucket, or say why it is quarantined."""
    store = open_store(in_url, endpoint)
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


class Encoder:
    """A Ray actor holding the frozen tokenizer (and text encoder): clips -> continuous latents, captions -> states."""

    def __init__(self, tokenizer_ckpt: str, cond: str, text_encoder: str, text_len: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.tokenizer, _, _ = load_tokenizer(tokenizer_ckpt)
        self.text = None
        if cond == "text":
            self.text = TextEncoder(text_encoder, text_len)

    def encode(self, clips: list[np.ndarray], caption: str, batch_size: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        import torch

        latents = []
        with torch.no_grad():
            for i in range(0, len(clips), batch_size):
                z = self.tokenizer.encode_latent(to_model_input(np.stack(clips[i:i + batch_size])))
                latents += list(z.transpose(1, 2).half().numpy())
        text = self.text.encode([caption])[0].half().numpy() if self.text is not None else None
        return latents, text

    def node(self) -> str:
        """The address of the node this actor runs on (reported in the summary)."""
        import ray

        return ray.util.get_node_ip_address()


# -- the driver ----------------------------------------------------------------------------------------------
@dataclass
class BucketWriter:
    bucket: Bucket
    next_index: int
    buffer: list = field(default_factory=list)
    inputs: set = field(default_factory=set)
    size: int = 0


def _progress_records(store: Store, kind: str) -> dict[str, dict]:
    return {k: json.loads(store.read(k)) for k, _ in store.list(f"{PROGRESS}/{kind}/")}


def preprocess(cfg, progress: bool = True) -> Summary:
    import ray

    p, d = cfg.preprocess, cfg.data
    endpoint = d.endpoint_url or None
    src, out = open_store(p.input, endpoint), open_store(p.output, endpoint)
    buckets = buckets_of(cfg)
    tok_hash = tokenizer_hash(cfg.videoar_train.tokenizer_ckpt)
    t0 = time.time()
    listed = list(src.list())
    exts = media_exts(buckets)
    inputs = [(k, s) for k, s in listed if Path(k).suffix.lower() in exts]
    if not inputs:
        raise FileNotFoundError(f"{p.input}: no videos ({', '.join(sorted(exts))}) found")
    not_videos = sorted(k for k, _ in listed if Path(k).suffix.lower() not in exts | SIDECAR_EXTS)
    done = {r["id"]: r for r in _progress_records(out, "inputs").values()}
    shards = _progress_records(out, "shards")
    if any(r.get("tokenizer") != tok_hash for r in shards.values()):
        raise ValueError(f"{p.output}: holds shards made with another tokenizer; use a new output location")
    out.clean_temporaries()  # temps of writes killed or out of retries in earlier runs, older than an hour
    todo = [(k, s) for k, s in inputs if input_id(k, s) not in done]
    summary = Summary(inputs=len(inputs), skipped=len(inputs) - len(todo), not_videos=not_videos)
    writers = {b.name: BucketWriter(b, 1 + max([int(r["name"][-10:-4]) for r in shards.values()
                                                  if r["name"].startswith(b.name + "/")], default=-1))
               for b in buckets}
    meter = Meter(cfg, summary, t0, progress)
    try:
        if not todo and out.exists(MANIFEST):  # everything is committed: write nothing
            manifest = json.loads(out.read(MANIFEST))
            summary.total_samples = sum(b["samples"] for b in manifest["buckets"].values())
            summary.quarantine = json.loads(out.read(QUARANTINE)) if out.exists(QUARANTINE) else []
        else:
            if todo:
                classes = folder_classes([k for k, _ in inputs]) if d.class_folders else {}
                _run(cfg, ray, src, out, todo, buckets, writers, tok_hash, summary, endpoint, meter, classes)
            _write_manifest(out, buckets, tok_hash, summary)
    finally:
        summary.seconds = time.time() - t0
        meter.close()
    return summary


def _add_encoded(w: BucketWriter, state: dict, iid: str, key: str, starts: list[int], latents, text, res: dict,
                 source: str, tok_hash: str) -> None:
    """Buffer one input's encoded clips of one bucket as shard samples."""
    for start, lat in zip(starts, latents):
        b = w.bucket
        meta = {"source": source, "start": start, "fps": res["fps"], "frames": b.frames, "height": b.height,
                "width": b.width, "latent_shape": list(lat.shape), "tokenizer": tok_hash}
        w.buffer.append(sample_dict(f"{iid}_{start:06d}", lat, res["caption"], meta, text, res["cls"]))
        w.size += lat.nbytes + (text.nbytes if text is not None else 0) + 4096
    w.inputs.add(iid)
    state["encodes"] -= 1
    state["buckets"].add(w.bucket.name)
    state["clips"] += len(starts)


def _run(cfg, ray, src, out, todo, buckets, writers, tok_hash, summary, endpoint, meter: Meter,
         classes: dict[str, int]) -> None:
    p, v = cfg.preprocess, cfg.videoar
    started_here = start_ray(ray, p, PROJECT_ROOT)
    meter.started()
    decode = ray.remote(decode_input)
    # SPREAD: on a cluster the encoders go to different nodes (each holds a tokenizer and reads its own inputs)
    actor_cls = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(Encoder)
    actors = [actor_cls.remote(cfg.videoar_train.tokenizer_ckpt, v.cond, v.text_encoder, v.text_len, 1)
              for _ in range(p.workers)]
    summary.encoder_nodes = sorted(set(ray.get([a.node.remote() for a in actors])))
    try:
        pending_decode = {decode.options(num_cpus=0.5).remote(src.url, endpoint, k, s, buckets, p.stride,
                                                             p.max_clips_per_video): (k, s) for k, s in todo}
        pending_encode: dict = {}
        waiting: dict[str, dict] = {}  # input id -> what is still open for it
        turn = 0
        while pending_decode or pending_encode:
            ready, _ = ray.wait(list(pending_decode) + list(pending_encode), num_returns=1)
            ref = ready[0]
            if ref in pending_decode:
                key, size = pending_decode.pop(ref)
                iid = input_id(key, size)
                res = ray.get(ref)
                if "quarantine" in res:
                    summary.quarantined += 1
                    _commit_input(out, {"id": iid, "input": src.join(key), "status": "quarantined",
                                        "reason": res["quarantine"]})
                    meter.input_done()
                    continue
                if classes:  # data.class_folders: the class is the folder, the caption its name unless a sidecar says
                    res.update(cls=classes[Path(key).parts[0]], caption=res["caption"] or Path(key).parts[0])
                waiting[iid] = {"encodes": len(res["clips"]), "buckets": set(), "key": key, "clips": 0}
                for bname, clips in res["clips"].items():
                    actor = actors[turn % len(actors)]
                    turn += 1
                    enc = actor.encode.remote([c for _, c in clips], res["caption"], p.batch_size)
                    pending_encode[enc] = (iid, key, bname, [s for s, _ in clips], res)
            else:
                iid, key, bname, starts, res = pending_encode.pop(ref)
                latents, text = ray.get(ref)
                w = writers[bname]
                _add_encoded(w, waiting[iid], iid, key, starts, latents, text, res, src.join(key), tok_hash)
                if w.size >= p.shard_bytes:
                    _flush(out, w, waiting, tok_hash, summary)
                for done_id in list(waiting):
                    if _finish_if_done(out, done_id, waiting, src, summary):
                        meter.input_done()
        for w in writers.values():
            _flush(out, w, waiting, tok_hash, summary)
        for iid in list(waiting):
            if _finish_if_done(out, iid, waiting, src, summary):
                meter.input_done()
    finally:
        for a in actors:  # actors left alive hold CPUs that later tasks wait for
            ray.kill(a)
        if started_here:
            ray.shutdown()


def _flush(out: Store, w: BucketWriter, waiting: dict, tok_hash: str, summary: Summary) -> None:
    if not w.buffer:
        return
    name = f"{w.bucket.name}/shard-{w.next_index:06d}.tar"
    record = write_tar_shard(out, name, w.buffer)
    rec = {**record.to_dict(), "tokenizer": tok_hash, "bucket": w.bucket.name}
    out.write(f"{PROGRESS}/shards/{w.bucket.name}/shard-{w.next_index:06d}.json", json.dumps(rec).encode())
    summary.shards += 1
    summary.bytes += record.bytes
    for iid in w.inputs:
        waiting[iid]["buckets"].discard(w.bucket.name)
    w.buffer, w.inputs, w.size, w.next_index = [], set(), 0, w.next_index + 1


def _finish_if_done(out: Store, iid: str, waiting: dict, src: Store, summary: Summary) -> bool:
    """Commit an input once all its clips are encoded and inside written shards."""
    state = waiting.get(iid)
    if state is None or state["encodes"] or state["buckets"]:
        return False
    _commit_input(out, {"id": iid, "input": src.join(state["key"]), "status": "ok", "clips": state["clips"]})
    summary.clips += state["clips"]
    del waiting[iid]
    return True


def _commit_input(out: Store, record: dict) -> None:
    out.write(f"{PROGRESS}/inputs/{record['id']}.json", json.dumps({**record, "time": time.time()}).encode())


def _write_manifest(out: Store, buckets: list[Bucket], tok_hash: str, summary: Summary) -> None:
    """Manifest of every committed shard (this run's and earlier runs'), and the quarantine report; last."""
    shards = sorted(_progress_records(out, "shards").values(), key=lambda r: r["name"])
    latest: dict[str, dict] = {}  # an input replaced since (another size: another id) reports its newest outcome
    for r in sorted(_progress_records(out, "inputs").values(), key=lambda r: r.get("time", 0.0)):
        latest[r["input"]] = r
    inputs = list(latest.values())
    summary.quarantine = sorted(({"input": r["input"], "reason": r["reason"]} for r in inputs
                                 if r["status"] == "quarantined"), key=lambda r: r["input"])
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": tok_hash, "created": time.time(),
                "inputs": {"ok": sum(r["status"] == "ok" for r in inputs), "quarantined": len(summary.quarantine)},
                "buckets": {}}
    for b in buckets:
        recs, seen = [], set()
        for r in (r for r in shards if r["bucket"] == b.name):
            # an input re-encoded after a crash between its shard and its commit record appears twice: the
            # manifest keeps the first copy only, so the loader never sees a duplicate
            offsets = [o for o in r["offsets"] if o[0] not in seen]
            seen.update(o[0] for o in offsets)
            recs.append(write_index(out, ShardRecord(r["name"], len(offsets), r["bytes"], r["sha256"],
                                                     offsets).to_dict()))
        manifest["buckets"][b.name] = {"height": b.height, "width": b.width, "frames": b.frames,
                                       "samples": sum(r["samples"] for r in recs), "shards": recs}
    summary.total_samples = sum(bk["samples"] for bk in manifest["buckets"].values())
    out.write(QUARANTINE, json.dumps(summary.quarantine, indent=1).encode())
    out.write(MANIFEST, json.dumps(manifest).encode())


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    cfg = config_from_args(parser.parse_args(argv), parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        s = preprocess(cfg)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    except OSError as e:  # e.g. a full output disk: committed inputs stay committed; rerun once there is space
        print(f"error: {e}; inputs committed so far are kept, rerun to continue", file=sys.stderr)
        return 1
    rate = s.clips / s.seconds if s.seconds else 0.0
    print(f"inputs {s.inputs} ({s.skipped} already committed), clips written {s.clips}, quarantined "
          f"{s.quarantined}, shards {s.shards} ({s.bytes / 2**20:.1f} MB), {rate:.1f} clips/s; "
          f"{s.total_samples} samples in {cfg.preprocess.output}/{MANIFEST}")
    if s.encoder_nodes:
        print(f"encoders on {len(s.encoder_nodes)} node(s): {', '.join(s.encoder_nodes)}")
    for q in s.quarantine:
        print(f"  quarantined {q['input']}: {q['reason']}")
    if s.not_videos:
        exts = ", ".join(sorted(media_exts(buckets_of(cfg))))
        print(f"skipped {len(s.not_videos)} files that are not videos ({exts}; "
              f"sidecars {', '.join(sorted(SIDECAR_EXTS))} aside): {', '.join(s.not_videos[:20])}"
              f"{' ...' if len(s.not_videos) > 20 else ''}")
    return 0 if s.total_samples > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
