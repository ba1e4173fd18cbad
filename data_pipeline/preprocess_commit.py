"""What a preprocessing run commits, and in which order (DESIGN §5): the encoder workers write the shards and the
per-input commit records, the driver merges the shard indexes into the manifest, written last.

Objects in the output store:

    <bucket>/shard-wWWW-SSSSSS.tar              a webdataset tar, written (atomically) by encoder worker WWW
    <bucket>/shard-wWWW-SSSSSS.index.json       its index: every sample's key and byte range, by the same worker
    _progress/shards/<bucket>/shard-....json    the shard's record (bytes, sha256, byte ranges, the inputs in it):
                                                written after the tar and its index, so a recorded shard is whole
    _progress/inputs/<input id>.json            an input's commit record: "quarantined" with the reason, or "ok"
                                                with its clip count and the shards holding its clips, written once
                                                every one of those shards is recorded
    quarantine.json, manifest.json              by the driver, the manifest last: the commit point for readers

Exactly once: a sample is live when its input's commit record names the sample's shard, so a crash anywhere
before an input's commit record leaves its samples dead (an input re-encoded by the next run commits with its
new shards). Records written before workers wrote shards (names `shard-000000.tar`) list no shards: their
samples are live in any recorded shard, first copy by shard name. After the manifest, the driver deletes the
shards without a live sample and the tars and indexes without a record (a worker killed mid-write); shards the
manifest names are never deleted.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

from data_pipeline.object_store import Store
from data_pipeline.shard_index import INDEX_SUFFIX, index_name, write_index
from data_pipeline.shards import ShardRecord

log = logging.getLogger("preprocess")
MANIFEST, QUARANTINE, PROGRESS = "manifest.json", "quarantine.json", "_progress"
FORMAT, FORMAT_VERSION = "videoar-shards", 2  # 2: byte ranges in per-shard index files
WORKER_SHARD = re.compile(r"/shard-w(\d+)-(\d+)\.tar$")


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"


def shard_name(bucket: str, worker: int, seq: int) -> str:
    """A worker-unique shard name: no two workers (or runs, see `first_sequences`) write the same one."""
    return f"{bucket}/shard-w{worker:03d}-{seq:06d}.tar"


def shard_record_key(shard: str) -> str:
    return f"{PROGRESS}/shards/{shard[:-4] if shard.endswith('.tar') else shard}.json"


def commit_input(out: Store, record: dict) -> dict:
    """Write an input's commit record (stamped with the time); returns it."""
    record = {**record, "time": time.time()}
    out.write(f"{PROGRESS}/inputs/{record['id']}.json", json.dumps(record).encode())
    return record


def read_records(out: Store, kind: str) -> dict[str, dict]:
    """The `kind` ("inputs" or "shards") progress records by key; a record that is not JSON is named."""
    records = {}
    for key, _ in out.list(f"{PROGRESS}/{kind}/"):
        try:
            records[key] = json.loads(out.read(key))
        except ValueError as e:
            raise ValueError(f"{out.join(key)}: not a JSON progress record ({e})") from None
    return records


def shard_objects(out: Store, buckets: list[Bucket]) -> list[str]:
    """Keys of the tars and indexes in the bucket folders (recorded or not)."""
    return [k for b in buckets for k, _ in out.list(f"{b.name}/") if k.endswith((".tar", INDEX_SUFFIX))]


def first_sequences(workers: int, shards: list[dict], objects: list[str]) -> list[int]:
    """Per worker, the first shard sequence number above every recorded or present shard of that worker."""
    last = [-1] * workers
    for name in [r["name"] for r in shards] + objects:
        m = WORKER_SHARD.search(name if name.endswith(".tar") else name[:-len(INDEX_SUFFIX)] + ".tar")
        if m and int(m.group(1)) < workers:
            last[int(m.group(1))] = max(last[int(m.group(1))], int(m.group(2)))
    return [n + 1 for n in last]


def live_offsets(shards: list[dict], inputs: list[dict]) -> dict[str, list]:
    """Per shard, the byte ranges of its live samples (see the module docstring), each sample key once."""
    committed = {r["id"]: r for r in inputs if r["status"] == "ok"}
    seen: dict[str, set] = {}
    live = {}
    for r in sorted(shards, key=lambda r: r["name"]):
        keys = seen.setdefault(r["bucket"], set())
        keep = []
        for o in r["offsets"]:
            rec = committed.get(o[0].rsplit("_", 1)[0])  # sample key: <input id>_<start frame>
            if rec is None or o[0] in keys or ("shards" in rec and r["name"] not in rec["shards"]):
                continue
            keep.append(o)
            keys.add(o[0])
        live[r["name"]] = keep
    return live


def quarantine_report(inputs: list[dict]) -> tuple[list[dict], int]:
    """(quarantined inputs with their reasons, number of ok inputs): the latest outcome per input (an input
    replaced since, another size and so another id, reports its newest)."""
    latest: dict[str, dict] = {}
    for r in sorted(inputs, key=lambda r: r.get("time", 0.0)):
        latest[r["input"]] = r
    bad = sorted(({"input": r["input"], "reason": r["reason"]} for r in latest.values()
                  if r["status"] == "quarantined"), key=lambda r: r["input"])
    return bad, sum(r["status"] == "ok" for r in latest.values())


def write_manifest(out: Store, buckets: list[Bucket], tok_hash: str, shards: list[dict],
                   inputs: list[dict]) -> tuple[dict, list[dict]]:
    """Merge the shard records (this run's and earlier runs') into the manifest, written after the quarantine
    report; a shard's index is rewritten only when some of its samples are dead. Returns (manifest, report)."""
    live = live_offsets(shards, inputs)
    report, ok = quarantine_report(inputs)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": tok_hash, "created": time.time(),
                "inputs": {"ok": ok, "quarantined": len(report)}, "buckets": {}}
    for b in buckets:
        entries = []
        for r in sorted((r for r in shards if r["bucket"] == b.name), key=lambda r: r["name"]):
            offsets = live[r["name"]]
            if not offsets:
                continue
            record = ShardRecord(r["name"], len(offsets), r["bytes"], r["sha256"], offsets).to_dict()
            if r.get("index") and len(offsets) == len(r["offsets"]):  # the worker's index holds exactly these
                entries.append({k: v for k, v in record.items() if k != "offsets"} | {"index": r["index"]})
            else:
                entries.append(write_index(out, record))
        manifest["buckets"][b.name] = {"height": b.height, "width": b.width, "frames": b.frames,
                                       "samples": sum(e["samples"] for e in entries), "shards": entries}
    out.write(QUARANTINE, json.dumps(report, indent=1).encode())
    out.write(MANIFEST, json.dumps(manifest).encode())
    return manifest, report


def collect_garbage(out: Store, manifest: dict, shards: list[dict], objects: list[str]) -> int:
    """After the manifest: delete recorded shards it does not name (no live sample: their inputs committed
    other copies) and tars and indexes without a record (a worker stopped between its writes). Returns the
    number of shards removed."""
    named = {s["name"] for bk in manifest["buckets"].values() for s in bk["shards"]}
    recorded = {r["name"] for r in shards}
    dead = sorted(recorded - named)
    for name in dead:
        for key in (name, index_name(name), shard_record_key(name)):
            out.delete(key)
    unrecorded = sorted({k if k.endswith(".tar") else k[:-len(INDEX_SUFFIX)] + ".tar" for k in objects} - recorded)
    for name in unrecorded:
        for key in (name, index_name(name)):
            if key in objects:
                out.delete(key)
    if dead or unrecorded:
        log.info("%s: removed %d shards without a live sample and %d without a record", out.url, len(dead),
                 len(unrecorded))
    return len(dead) + len(unrecorded)
