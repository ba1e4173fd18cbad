"""Config of the preprocessing job (one section of the shared config; see trainer/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from models.validation import check


@dataclass
class PreprocessConfig:
    input: str = "runs/demo/clips"  # directory or s3://bucket/prefix of videos (+ optional .json/.txt captions)
    output: str = "runs/demo/shards"  # directory or s3://bucket/prefix; one folder per bucket <H>x<W>x<F>
    stride: int = 0  # frames between consecutive clip starts of one video (0 = the bucket's frame count)
    max_clips_per_video: int = 0  # 0 = all
    shard_bytes: int = 268_435_456  # target shard size (a shard closes once it reaches this)
    workers: int = 2  # tokenizer-encoder actors (GPU actors on a cluster)
    batch_size: int = 8  # clips per encoder call
    ray_address: str = ""  # "" = a local Ray runtime; else e.g. ray://head:10001 or "auto"

    def __post_init__(self) -> None:
        p = "preprocess"
        check(self.stride >= 0 and self.max_clips_per_video >= 0, f"{p}.stride/max_clips_per_video", "must be >= 0")
        check(self.shard_bytes >= 1024, f"{p}.shard_bytes", f"must be >= 1024, got {self.shard_bytes}")
        check(self.workers >= 1 and self.batch_size >= 1, f"{p}.workers/batch_size", "must be >= 1")
