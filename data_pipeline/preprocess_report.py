"""What a preprocessing run reports: its `Summary` (returned to the caller) and its `Meter` (progress bar and
metrics through the trainer's sinks in `<run.dir>/preprocess/`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm import tqdm

from common.metrics import MetricSinks


@dataclass
class Summary:
    inputs: int = 0
    skipped: int = 0
    quarantined: int = 0
    clips: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # of `seconds`, until the Ray runtime and the encoder workers were up
    total_samples: int = 0
    quarantine: list = field(default_factory=list)
    not_videos: list = field(default_factory=list)  # input files skipped for their extension (sidecars aside)
    encoder_nodes: list = field(default_factory=list)  # addresses of the nodes the encoder actors ran on
    worker_seconds: dict = field(default_factory=dict)  # busy seconds of all encoder workers: decode, encode, write


class Meter:
    """The progress bar and the metrics of one run: a record whenever an input is done (at most one per `every_s`
    seconds) and a final one, through `common.metrics.MetricSinks` in `<run.dir>/preprocess/`. `step` and
    `inputs_done` count inputs done, including those committed by earlier runs; `clips`, `bytes` (shard bytes
    written), `quarantined` and `shards` count this run's work. Rates are over `work_s`, the time since the Ray
    runtime and the encoder workers were up (tokenizers loaded; `startup_s` before), so a short job's clips/s is
    not mostly start-up."""

    def __init__(self, cfg, summary: Summary, t0: float, bar: bool, every_s: float = 2.0):
        self.summary, self.t0, self.every_s, self.last = summary, t0, every_s, float("-inf")
        self.work_t0 = t0
        self.done = summary.skipped
        self.bar = tqdm(total=summary.inputs - summary.skipped, desc="preprocess", unit="video", disable=not bar)
        self.sinks = MetricSinks(cfg.run_dir / "preprocess", prefix="preprocess", append=False,
                                 tensorboard=cfg.run.tensorboard, prometheus_port=cfg.run.metrics_port)

    def started(self) -> None:
        """The workers can take work: the clock of the rates starts."""
        self.work_t0 = time.time()
        self.summary.startup_seconds = self.work_t0 - self.t0

    def input_done(self) -> None:
        self.done += 1
        self.bar.update(1)
        if time.time() - self.last >= self.every_s:
            self.log()

    def log(self) -> None:
        s, self.last = self.summary, time.time()
        work = max(self.last - self.work_t0, 1e-6)
        self.sinks.log({"step": self.done, "inputs_done": self.done, "inputs_total": s.inputs, "clips": s.clips,
                        "clips_per_s": s.clips / work, "bytes": s.bytes, "bytes_per_s": s.bytes / work,
                        "quarantined": s.quarantined, "shards": s.shards, "elapsed_s": round(self.last - self.t0, 3),
                        "startup_s": round(self.work_t0 - self.t0, 3), "work_s": round(work, 3)})

    def close(self) -> None:
        """The final record; then the sinks are closed."""
        self.bar.close()
        try:
            self.log()
        finally:
            self.sinks.close()
