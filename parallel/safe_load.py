"""Checkpoint files read as untrusted input. `refusal_reason` says why `torch.load(weights_only=True)` refused one.
DeepSpeed's files: `torch.load(weights_only=True)` instead of DeepSpeed's own
`weights_only=False`, so a crafted file cannot run code. Besides tensors and containers, DeepSpeed pickles three
plain types of its own (an enum, the loss-scaler's fields, a dataclass of fragment offsets); only those are allowed.
Used for resume (`WeightsOnlyCheckpointEngine` in place of DeepSpeed's checkpoint engine) and for consolidation
(`verify_deepspeed_dir` before DeepSpeed's zero_to_fp32 reads the files)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch


def refusal_reason(error: Exception) -> str:
    """The pickled type that made a weights-only load fail (torch's message is a page long)."""
    text = str(error)
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"it pickles {m.group(1)}, not an allowed type"
    if m := re.search(r"WeightsUnpickler error: ([^\n]+)", text):
        return m.group(1)[:300]
    return text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__


def _deepspeed_types() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def load_deepspeed_file(path: str | Path, map_location: Any = None) -> Any:
    """One DeepSpeed checkpoint file, tensors and DeepSpeed's three plain types only; anything else is refused."""
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: the file holds pickled objects other than tensors and DeepSpeed's "
                         f"checkpoint types, and loading it could run code ({refusal_reason(e)})") from None


def verify_deepspeed_dir(directory: str | Path) -> None:
    """Every `*.pt` file under `directory` loads under `load_deepspeed_file` (raises otherwise)."""
    for path in sorted(Path(directory).rglob("*.pt")):
        load_deepspeed_file(path, "cpu")


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` through `load_deepspeed_file`; everything else is the original's."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_deepspeed_file(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# What DCP's `.metadata` (a plain pickle, which DCP's own reader loads with `pickle.load`) may reference: its
# metadata dataclasses, torch.Size, dtypes, the layout helper and paths; anything else is refused
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _DCP_METADATA_MODULES or (module, name) in _DCP_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it pickles {module}.{name}, not a DCP metadata type")


def load_dcp_metadata(path: str | Path) -> Any:
    """A DCP checkpoint's `.metadata`, its own types only (DCP's reader would unpickle anything)."""
    try:
        with open(path, "rb") as f:
            return _DCPMetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: refused: not a DCP metadata file ({refusal_reason(e)})") from None
