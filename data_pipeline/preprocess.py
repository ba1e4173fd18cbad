"""Preprocess videos into pre-tokenized WebDataset shards, orchestrated by Ray (DESIGN §5).

    python -m data_pipeline.preprocess --config configs/demo.yaml [preprocess.input=DIR|s3://...]
        [preprocess.output=DIR|s3://...] [preprocess.ray_address=auto] [data.endpoint_url=http://...]

discover -> encoder workers (`preprocess.workers` Ray actors, a GPU each where the cluster has GPUs; the driver
keeps two inputs queued at each): probe/filter -> split into clips of each curriculum bucket's frame count ->
resize/crop to the bucket's resolution -> tokenizer encoder + text encoder -> the worker's own shards per bucket
`<output>/<H>x<W>x<F>/shard-w<worker>-<seq>.tar` and per-input commit records -> the driver merges the shard
indexes the workers return into `manifest.json` (the commit point, written last). The protocol, and why a rerun
after a crash anywhere gives every sample exactly once: `data_pipeline/preprocess_commit.py`.

Bad inputs (unreadable, truncated, empty, audio-only, too short, too small) are recorded with the reason in
`quarantine.json`; the job exits non-zero only if nothing usable remains. An input is committed (under
`_progress/inputs/`) once the shards holding its clips are written, so a re-run (or a run after a crash) skips
committed inputs and never duplicates a sample.

Metrics (clips/s, bytes/s, quarantine counts) go through the trainer's sinks (JSONL, TensorBoard,
Prometheus) to the local directory `<run.dir>/preprocess/` (`preprocess_report.Meter`), whatever the output
store is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

from common.config import config_arg_parser, config_from_args
from data_pipeline.clips import IMAGE_EXTS, SIDECAR_EXTS, VIDEO_EXTS, folder_classes
from data_pipeline.object_store import open_store
from data_pipeline.preprocess_commit import (FORMAT, FORMAT_VERSION, MANIFEST, QUARANTINE, Bucket, collect_garbage,
                                             first_sequences, read_records, shard_objects, write_manifest)
from data_pipeline.preprocess_report import Meter, Summary
from data_pipeline.preprocess_worker import ShardWorker, WorkerJob
from data_pipeline.ray_runtime import start_ray
from data_pipeline.tokenizer_ckpt import WEIGHTS

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "PROJECT_ROOT", "QUARANTINE", "Bucket", "buckets_of", "input_id",
           "preprocess"]
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


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


# -- the driver: schedules inputs, merges the workers' shard indexes, writes the manifest last -------------------
def preprocess(cfg, progress: bool = True) -> Summary:
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
    done = {r["id"]: r for r in read_records(out, "inputs").values()}
    shards = list(read_records(out, "shards").values())
    if any(r.get("tokenizer") != tok_hash for r in shards):
        raise ValueError(f"{p.output}: holds shards made with another tokenizer; use a new output location")
    out.clean_temporaries()  # temps of writes killed or out of retries in earlier runs, older than an hour
    todo = [(k, s) for k, s in inputs if input_id(k, s) not in done]
    summary = Summary(inputs=len(inputs), skipped=len(inputs) - len(todo), not_videos=not_videos)
    meter = Meter(cfg, summary, t0, progress)
    try:
        if not todo and out.exists(MANIFEST):  # everything is committed: write nothing
            manifest = json.loads(out.read(MANIFEST))
            summary.total_samples = sum(b["samples"] for b in manifest["buckets"].values())
            summary.quarantine = json.loads(out.read(QUARANTINE)) if out.exists(QUARANTINE) else []
        else:
            objects = shard_objects(out, buckets)  # what an earlier run may have left unrecorded
            if todo:
                classes = folder_classes([k for k, _ in inputs]) if d.class_folders else {}
                job = WorkerJob(src.url, out.url, endpoint, tuple(buckets), str(cfg.videoar_train.tokenizer_ckpt),
                                tok_hash, cfg.videoar.cond, cfg.videoar.text_encoder, cfg.videoar.text_len, p.stride,
                                p.max_clips_per_video, p.batch_size, p.shard_bytes)
                work = [(input_id(k, s), k, s, (classes[Path(k).parts[0]], Path(k).parts[0]) if classes else None)
                        for k, s in todo]
                new_shards, new_inputs = _run(p, job, work, first_sequences(p.workers, shards, objects), summary,
                                              meter)
                shards += new_shards
                done.update((r["id"], r) for r in new_inputs)
            manifest, summary.quarantine = write_manifest(out, buckets, tok_hash, shards, list(done.values()))
            summary.total_samples = sum(bk["samples"] for bk in manifest["buckets"].values())
            collect_garbage(out, manifest, shards, objects)
    finally:
        summary.seconds = time.time() - t0
        meter.close()
    return summary


def worker_resources(ray, workers: int) -> dict:
    """Ray options of the encoder actors: a CPU slot each, a GPU each where the cluster has GPUs (a share of one
    when there are fewer GPUs than workers); SPREAD: on a cluster they go to different nodes."""
    gpus = ray.cluster_resources().get("GPU", 0)
    return {"num_cpus": 1, "scheduling_strategy": "SPREAD"} | ({"num_gpus": min(1.0, gpus / workers)} if gpus else {})


@contextlib.contextmanager
def worker_errors(ray):
    """A worker's OSError (a full output disk) or ValueError surfaces as itself, errno and path included."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (OSError, ValueError)):
            raise e.cause from e
        raise


def schedule(ray, actors: list, work: list[tuple], depth: int = 2):
    """Yield the workers' reports as they come (`ray.wait` over the tasks in flight), giving each worker its next
    input as soon as one of its `depth` queued inputs is done: a worker never waits for the driver between two."""
    queue, inflight = iter(work), {}

    def submit(actor) -> None:
        item = next(queue, None)
        if item is not None:
            inflight[actor.process.remote(*item)] = actor
    for actor in actors:
        for _ in range(depth):
            submit(actor)
    while inflight:
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        actor = inflight.pop(ref)
        yield ray.get(ref)
        submit(actor)


def _run(p, job: WorkerJob, work: list[tuple], first_seq: list[int], summary: Summary,
         meter: Meter) -> tuple[list[dict], list[dict]]:
    """The inputs through the workers; returns the shard records and input commit records the workers wrote."""
    import ray

    started_here = start_ray(ray, p, PROJECT_ROOT)
    actor_cls = ray.remote(**worker_resources(ray, p.workers))(ShardWorker)
    actors = [actor_cls.remote(job, w, first_seq[w]) for w in range(p.workers)]
    shards, inputs = [], []

    def take(report: dict) -> None:
        shards.extend(report["shards"])
        summary.shards += len(report["shards"])
        summary.bytes += sum(r["bytes"] for r in report["shards"])
        for what, seconds in report["busy"].items():
            summary.worker_seconds[what] = summary.worker_seconds.get(what, 0.0) + seconds
        for r in report["committed"]:
            inputs.append(r)
            summary.clips += r.get("clips", 0)
            summary.quarantined += r["status"] == "quarantined"
            meter.input_done()

    try:
        with worker_errors(ray):
            summary.encoder_nodes = sorted(set(ray.get([a.node.remote() for a in actors])))
            meter.started()  # the workers are up (tokenizers loaded): the rates' clock starts
            for report in schedule(ray, actors, work):
                take(report)
            for report in ray.get([a.finish.remote() for a in actors]):
                take(report)
    finally:
        for a in actors:  # actors left alive hold CPUs that later tasks wait for
            ray.kill(a)
        if started_here:
            ray.shutdown()
    return shards, inputs

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
