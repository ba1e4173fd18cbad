"""Metric helpers: quality numbers and the JSONL metrics log every run writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch


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
