"""Tokenizer checkpoints: weights as safetensors plus the full run config as JSON, both written atomically.

Checkpoints are untrusted input: safetensors holds only tensors (no pickle), the JSON is validated through the
typed config, and every tensor's name and shape must match the model the config builds.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from common.atomic import atomic_write_bytes, atomic_write_text
from models.tokenizer import VideoTokenizer
from common.config import Config, config_from_dict, config_to_dict

FORMAT = "videoar-tokenizer"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_tokenizer(model: VideoTokenizer, cfg: Config, directory: str | Path, step: int) -> Path:
    directory = Path(directory)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "step": str(step)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # config first: weights are the commit point a reader looks for.
    atomic_write_text(directory / CONFIG, json.dumps(config_to_dict(cfg), indent=2, sort_keys=True))
    atomic_write_bytes(directory / WEIGHTS, save(state, metadata=meta))
    return directory


def load_tokenizer(directory: str | Path, device: str = "cpu") -> tuple[VideoTokenizer, Config, int]:
    """(model in eval mode, its config, training step) from a directory written by `save_tokenizer`."""
    directory = Path(directory)
    weights, cfg_path = directory / WEIGHTS, directory / CONFIG
    for p in (weights, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; is {directory} a tokenizer checkpoint directory?")
    try:
        with safe_open(weights, framework="pt", device=device) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    try:
        raw = json.loads(cfg_path.read_text())
        quant = raw.get("quantizer") if isinstance(raw, dict) else None
        if isinstance(quant, dict) and "gain" not in quant and "quantizer.log_gain" in state:
            quant["gain"] = "learned"  # written before quantizer.gain existed: its gains were always learned
        cfg = config_from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: invalid tokenizer config ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{weights}: expected format {FORMAT} v{FORMAT_VERSION}, found "
                         f"{meta.get('format')} v{meta.get('format_version')}")
    model = VideoTokenizer(cfg.tokenizer, cfg.quantizer)
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise ValueError(f"{weights}: does not match the model its config builds: {'; '.join(problems[:5])}")
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, int(meta.get("step", 0))
