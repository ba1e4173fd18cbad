"""Which dtype autocast uses for a `precision` setting (`tokenizer_train.precision`, `videoar_train.precision`).

`auto` picks bf16 only where bf16 matmuls and convolutions are fast: a CUDA device with bf16 support, or a CPU with
AMX tiles (oneDNN's bf16 kernels; measured on a 2-core Sapphire Rapids: demo tokenizer step 0.106 -> 0.066 s,
VideoAR full-stage step 0.236 -> 0.207 s). Elsewhere bf16 is emulated and slower, so `auto` stays fp32.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config classes import this module; loading a config needs no torch
    import torch

PRECISIONS = ("fp32", "bf16", "auto")


def fast_bf16(device: torch.device | str) -> bool:
    """Does this device run bf16 GEMMs/convs natively (faster than fp32)?"""
    import torch

    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """torch.bfloat16 when `precision` asks for it (bf16, or auto on a fast-bf16 device); None = plain fp32."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and fast_bf16(device)):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device | str):
    """The forward's autocast context for `precision` on `device`; for fp32 no autocast at all (torch.autocast,
    even disabled, rejects devices such as `meta`)."""
    import torch

    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)
