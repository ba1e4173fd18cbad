"""What one logged training step reports beyond the loss (DESIGN §6): throughput, MFU, the step-time breakdown
and peak memory, aggregated over ranks (the slowest rank sets the pace, so times and memory are maxima)."""

from __future__ import annotations

import resource
import sys
import time

import torch

PHASES = ("time/data_s", "time/prepare_s", "time/fwd_bwd_s", "time/optimizer_s", "time/checkpoint_s")
PER_RANK = PHASES + ("mem/peak_rss_gb", "mem/peak_device_gb")


def clock(device: torch.device) -> float:
    """A phase boundary: wall time after the device's queued work is done (CUDA runs asynchronously, so an
    unsynchronized timer would charge one phase's kernels to the next)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_gb(device: torch.device) -> tuple[float, float]:
    """(peak resident set size of this process, peak CUDA allocation) in GB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return rss / 1e9, cuda / 1e9


def throughput(rec: dict, world: int, peak_flops: float) -> dict[str, float]:
    """Tokens/s (global and per device), achieved model FLOP/s and MFU of one step from its (rank-maximal)
    phase times. `rec` holds the step's `tokens` and `model_flops` (useful: attention over the visible pairs)
    for the global batch, and optionally `model_flops_dense` (L x L attention): `mfu_dense` then."""
    step_time = sum(rec[k] for k in PHASES)
    flops_per_s = rec["model_flops"] / step_time
    out = {"step_time_s": step_time, "tokens_per_s": rec["tokens"] / step_time,
           "tokens_per_s_per_device": rec["tokens"] / step_time / world, "model_flops_per_s": flops_per_s,
           "peak_flops_per_device": peak_flops, "mfu": flops_per_s / (world * peak_flops),
           "data_wait_frac": rec["time/data_s"] / step_time}
    if "model_flops_dense" in rec:
        out["mfu_dense"] = rec["model_flops_dense"] / step_time / (world * peak_flops)
    return out
