"""bf16 autocast: `auto` resolves by the device's bf16 support, the tokenizer's quantizer and the CPU attention stay
fp32 under autocast, and a bf16 tokenizer step matches the fp32 one within bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.config import load_config
from common.precision import autocast_dtype
from common.validation import ConfigError
from models.tokenizer import VideoTokenizer
from models.videoar import Attention, VideoARConfig
from parallel.optim import param_groups
from trainer.tokenizer_gan import TokenizerGan
from trainer.train_tokenizer import train_step


@pytest.mark.parametrize("amx", [True, False])
def test_auto_is_bf16_only_on_a_cpu_with_amx(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert autocast_dtype("auto", "cpu") == (torch.bfloat16 if amx else None)
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16 and autocast_dtype("fp32", "cpu") is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16", "cpu")


def test_config_rejects_an_unknown_precision_naming_the_field():
    for key in ("tokenizer_train.precision", "videoar_train.precision"):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [f"{key}=fp16"])
        assert getattr(load_config(None, [f"{key}=auto"]), key.split(".")[0]).precision == "auto"


def test_cpu_attention_under_bf16_autocast_runs_in_fp32():
    """The result is fp32 SDPA of the bf16 inputs, rounded to bf16 once (not bf16 SDPA)."""
    attn = Attention(VideoARConfig(preset="custom", depth=1, width=64, heads=2))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 32, generator=g).bfloat16() for _ in range(3))
    mask = torch.rand(40, 40, generator=g) > 0.3
    mask |= torch.eye(40, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn.attend(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_qk_norm_and_rope_get_fp32_under_bf16_autocast():
    """q and k reach QK-norm in fp32 (RMSNorm's fused kernel needs input dtype = weight dtype; bf16 input fell
    back to the unfused one with a warning) and the block output is the autocast dtype."""
    attn = Attention(VideoARConfig(preset="custom", depth=1, width=64, heads=2))
    seen = []
    for norm in (attn.q_norm, attn.k_norm):
        norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    rotation = torch.zeros(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, rotation, torch.ones(10, 10, dtype=torch.bool))
    assert seen == [torch.float32, torch.float32] and out.dtype == torch.bfloat16


def _tokenizer_step(precision: str, clips_dir) -> tuple[dict, VideoTokenizer, torch.Tensor]:
    from tests.conftest import TINY
    from tests.test_tokenizer import real_clip

    cfg = load_config(None, TINY + [f"tokenizer_train.precision={precision}"])
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.tokenizer, cfg.quantizer)
    t = cfg.tokenizer_train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    x = real_clip(clips_dir, frames=cfg.data.frames).repeat(2, 1, 1, 1, 1)  # 32x32 clips = TINY's resolution
    parts = train_step(model, TokenizerGan(t, model, "cpu", 0), opt, x, 1, t)
    return parts, model, x


def test_bf16_tokenizer_step_is_close_to_fp32_with_an_fp32_quantizer(clips_dir):
    fp32, _, _ = _tokenizer_step("fp32", clips_dir)
    bf16, model, x = _tokenizer_step("bf16", clips_dir)
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2) and bf16["loss"] != fp32["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.recon.dtype == out.latent.dtype == out.quant.quantized.dtype == torch.float32
    # the quantizer ran in fp32 on the (bf16-computed) latent: its codes are the fp32 quantizer's on that latent
    with torch.no_grad():
        ref = model.quantizer(model.frames_to_batch(out.latent))
    assert all(torch.equal(a, b) for a, b in zip(out.quant.bits, ref.bits))
