"""`tokenizer_train.init_from`: start the 3D tokenizer from a 2D image tokenizer checkpoint (DESIGN §3.1).

The source must be a tokenizer trained with tokenizer.time_kernel=1 and tokenizer.temporal_compression=1 (on
frames: `python -m trainer.train_tokenizer --config X tokenizer.time_kernel=1 tokenizer.temporal_compression=1
data.frames=1 run.dir=runs/tok2d`) and otherwise the same widths, latent size and quantizer gains; its 2D kernels
go into the temporally last slice of the 3D ones (models/tokenizer.py inflate_from_2d, `tokenizer_train.init_mode`).
"""

from __future__ import annotations

from dataclasses import asdict

from common.config import Config
from data_pipeline.tokenizer_ckpt import load_tokenizer
from models.tokenizer import VideoTokenizer, inflate_from_2d

KEY = "tokenizer_train.init_from"
SAME_FIELDS = ("latent_dim", "spatial_compression", "base_channels", "channel_mult", "num_res_blocks")


def init_from_2d(model: VideoTokenizer, cfg: Config) -> int | None:
    """Inflate `tokenizer_train.init_from` into `model` in place; the 2D checkpoint's step, or None when
    init_from is "" (the model is left untouched). Errors name the config key and the checkpoint."""
    t = cfg.tokenizer_train
    if not t.init_from:
        return None
    try:
        src, src_cfg, step = load_tokenizer(t.init_from)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{KEY}={t.init_from!r}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{KEY}={t.init_from!r}: {e}") from None
    tk = src_cfg.tokenizer
    if tk.time_kernel != 1 or tk.temporal_compression != 1:
        raise ValueError(f"{KEY}={t.init_from!r}: a tokenizer with time_kernel={tk.time_kernel}, "
                         f"temporal_compression={tk.temporal_compression}; inflation needs a 2D image tokenizer "
                         f"(tokenizer.time_kernel=1 tokenizer.temporal_compression=1)")
    own, theirs = asdict(cfg.tokenizer), asdict(tk)
    differ = [f"tokenizer.{k}: {theirs[k]} vs {own[k]}" for k in SAME_FIELDS if own[k] != theirs[k]]
    gains = getattr(src_cfg.quantizer, "gain", None), getattr(cfg.quantizer, "gain", None)
    if gains[0] != gains[1]:
        differ.append(f"quantizer.gain: {gains[0]} vs {gains[1]}")
    if differ:
        raise ValueError(f"{KEY}={t.init_from!r}: the 2D tokenizer differs from this one ({'; '.join(differ)})")
    try:
        inflate_from_2d(model, src.state_dict(), mode=t.init_mode, seed=cfg.run.seed)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{KEY}={t.init_from!r}: cannot inflate ({e})") from None
    return step
