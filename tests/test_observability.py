"""Metrics every run reports (issue 7): the same names and values in metrics.jsonl, the TensorBoard event files
(read back with tensorboard's own reader) and the Prometheus endpoint (scraped over HTTP), and MFU against a
hand count."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import make_cfg
from common.metrics import MetricSinks, numeric, prometheus_name, read_jsonl
from trainer.step_metrics import PHASES
from trainer.train_videoar import VideoARTrainer

# TINY + VIDEOAR (tests/conftest.py): width 32, depth 2, MLP hidden 88, latent_dim 8, scales 1,2,4 -> 21 tokens
# per latent frame; 5 video frames -> 2 latent frames -> 42 video tokens + 1 class token: L = 43.
L, VIDEO = 43, 42
PER_LAYER = (2 * L * 96 * 32  # qkv
             + 2 * (2 * L * L * 32)  # scores + values (dense, masked entries included)
             + 2 * L * 32 * 32  # attention output projection
             + 3 * (2 * L * 88 * 32))  # SwiGLU gate, up, down
FORWARD = 2 * PER_LAYER + 2 * VIDEO * 32 * 8 + 2 * VIDEO * 16 * 32  # + input projection + bitwise head
assert FORWARD == 2_695_424
DENSE_STEP_FLOPS = 3 * FORWARD * 4  # forward + backward, global batch 4
# the mask's visible pairs: prefix 1; frame 0: 1*2 + 4*6 + 16*22 = 378; frame 1: 1*23 + 4*27 + 16*43 = 819
PAIRS = 1 + 378 + 819
STEP_FLOPS = DENSE_STEP_FLOPS - 3 * 4 * 2 * (2 * 2 * (L * L - PAIRS) * 32)  # useful: attention over PAIRS
PEAK = 1e9
EXPECTED_KEYS = {"loss", "bit_acc", "loss_scale0", "loss_scale2", "loss_frame0", "loss_frame1", "grad_norm", "lr",
                 "flip_ratio", "frame_mask_p", "stage_index", "consumed_samples", "consumed_tokens", "tokens_per_s",
                 "tokens_per_s_per_device", "mfu", "model_flops_per_s", "step_time_s", "data_wait_frac",
                 "mem/peak_rss_gb", "skipped_steps", *PHASES}


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_jsonl_tensorboard_and_prometheus_agree_and_mfu_is_the_hand_count(clips_dir, tokenizer_ckpt, tmp_path):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, "videoar_train.steps=3", f"run.peak_flops={PEAK}")
    out = tmp_path / "videoar"
    sinks = MetricSinks(out, "videoar", prometheus_port=0)
    try:
        VideoARTrainer(cfg, progress=False).train(sinks=sinks)
        assert (out / "metrics_endpoint").read_text().strip() == sinks.url
        scraped = scrape(sinks.url)
    finally:
        sinks.close()
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    last = numeric(records[-1])
    assert EXPECTED_KEYS <= set(last)

    # Prometheus holds the last record, every numeric key under its sanitised name, values exact
    assert scraped["videoar_step"] == 3
    for key, value in last.items():
        assert scraped[prometheus_name("videoar", key)] == value, key

    # TensorBoard has every step of every numeric key (float32 scalars)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(last)
    for key in last:
        got = {e.step: e.value for e in events.Scalars(key)}
        want = {r["step"]: numeric(r)[key] for r in records}
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), key

    for r in records:
        step_time = sum(r[k] for k in PHASES)
        assert r["model_flops"] == STEP_FLOPS == 30_345_216 and r["model_flops_dense"] == DENSE_STEP_FLOPS
        assert r["mfu_dense"] == pytest.approx(DENSE_STEP_FLOPS / step_time / PEAK, rel=1e-12)
        assert r["step_time_s"] == pytest.approx(step_time, rel=1e-12)
        assert r["mfu"] == pytest.approx(STEP_FLOPS / step_time / PEAK, rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(4 * VIDEO / step_time, rel=1e-12)
        assert r["consumed_samples"] == 4 * r["step"] and r["consumed_tokens"] == 4 * VIDEO * r["step"]
        assert 0 <= r["data_wait_frac"] <= 1 and r["mem/peak_rss_gb"] > 0.05


def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    first = MetricSinks(tmp_path / "a", "videoar", tensorboard=False, prometheus_port=0)
    try:
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(OSError, match="run.metrics_port"):
            MetricSinks(tmp_path / "b", "videoar", tensorboard=False, prometheus_port=port)
    finally:
        first.close()
