"""Metric helpers: quality numbers, and the sinks every run writes its per-step records to (DESIGN §6).

A record is a flat dict (`{"step": 12, "stage": "low", "loss": 0.61, "time/data_s": 0.01, ...}`). `MetricSinks`
fans it out to three places under the same names:
- `metrics.jsonl`: every key, one JSON object per line (with wall time), flushed so dashboards can tail it;
- TensorBoard event files (`tensorboard/`, `torch.utils.tensorboard`): numeric keys as scalars, tag = key;
- a Prometheus endpoint on 127.0.0.1 (`prometheus_client`): numeric keys as gauges named
  `prometheus_name(prefix, key)`, e.g. `videoar_time_data_s`; its URL is written to `metrics_endpoint`, and the
  target to `prometheus_targets.json` (Prometheus file_sd format, so a scrape config can follow a port chosen at
  start-up; removed on a clean close, so a target left `up == 0` means the process died; configs/prometheus/).
Only one process of a job (rank 0) owns the sinks; the trainer aggregates over ranks before logging.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_write_text

log = logging.getLogger(__name__)
ENDPOINT_FILE = "metrics_endpoint"
TARGETS_FILE = "prometheus_targets.json"


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB between videos in [-1, 1]."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


class JsonlLogger:
    """One JSON object per line (with wall time), flushed so dashboards can tail it. `append=False` starts the
    file afresh (a new run); a resumed run appends."""

    def __init__(self, path: str | Path, append: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a" if append else "w", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics log; a torn last line (the writer was killed mid-write) is ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def prometheus_name(prefix: str, key: str) -> str:
    """`videoar` + `time/data_s` -> `videoar_time_data_s` (Prometheus allows [a-zA-Z0-9_:])."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", f"{prefix}_{key}")


def numeric(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}


class LatestRecord:
    """A prometheus_client collector: the last logged values as gauges. `values` is replaced whole, never
    updated in place, so a scrape (another thread) never mixes two steps' numbers."""

    def __init__(self, prefix: str):
        self.prefix, self.values = prefix, {}

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        for key, v in self.values.items():
            yield GaugeMetricFamily(prometheus_name(self.prefix, key), f"{self.prefix} {key} (see metrics.jsonl)",
                                    value=v)


class MetricSinks:
    """JSONL + TensorBoard + Prometheus for one job (see the module docstring).

    `prometheus_port`: 0 = a free port (announced in the log and in `<out_dir>/metrics_endpoint`), -1 = no
    endpoint. `append`: keep the JSONL of an earlier attempt (a resumed run)."""

    def __init__(self, out_dir: str | Path, prefix: str, append: bool = False, tensorboard: bool = True,
                 prometheus_port: int = 0):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.url, self._server, self._latest = None, None, None
        if prometheus_port >= 0:
            from prometheus_client import CollectorRegistry, start_http_server

            registry, self._latest = CollectorRegistry(), LatestRecord(prefix)
            registry.register(self._latest)
            try:
                self._server, _ = start_http_server(prometheus_port, addr="127.0.0.1", registry=registry)
            except OSError as e:
                raise OSError(f"cannot serve Prometheus metrics on 127.0.0.1:{prometheus_port} ({e}); choose "
                              "another run.metrics_port (0 = any free port, -1 = off)") from None
            self.url = f"http://127.0.0.1:{self._server.server_port}/metrics"
            atomic_write_text(self.out_dir / ENDPOINT_FILE, self.url + "\n")
            target = {"targets": [f"127.0.0.1:{self._server.server_port}"],
                      "labels": {"metrics_dir": str(self.out_dir.resolve())}}
            atomic_write_text(self.out_dir / TARGETS_FILE, json.dumps([target]) + "\n")
            log.info("Prometheus metrics at %s", self.url)
        self.jsonl = JsonlLogger(self.out_dir / "metrics.jsonl", append=append)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), flush_secs=10)

    def log(self, record: dict[str, Any]) -> None:
        self.jsonl.log(record)
        values = numeric(record)
        step = int(record.get("step", 0))
        if self.tb is not None:
            for key, v in values.items():
                self.tb.add_scalar(key, v, step)
        if self._latest is not None:  # keys missing from this record (eval/*) keep their last value
            self._latest.values = {**self._latest.values, "step": float(step), **values}

    def log_image(self, tag: str, png: str | Path, step: int) -> None:
        """A PNG (a contact sheet of samples or reconstructions) as a TensorBoard image; JSONL and Prometheus
        carry numbers only."""
        if self.tb is None:
            return
        from PIL import Image

        with Image.open(png) as im:
            self.tb.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            (self.out_dir / TARGETS_FILE).unlink(missing_ok=True)
