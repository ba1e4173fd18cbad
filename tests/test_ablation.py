"""`python -m benchmarks.ablation`: arms differ only by their overrides, share data and tokenizer, are evaluated the
same way, and a finished arm is reused rather than retrained."""

from __future__ import annotations

import json

import pytest

from benchmarks.ablation import PAPER_ARMS, main, parse_arm
from common.config import load_config, save_config
from common.metrics import read_jsonl
from tests.conftest import TINY, VIDEOAR

ARMS = ["flat: videoar.rope=flat", "temporal: videoar.rope=temporal stages.flip_end=0.2 stages.p_mask=0.5"]


def test_arms_parse_and_bad_arms_are_refused():
    assert parse_arm("a_1: videoar.rope=flat stages.flip_end=0.25") == ("a_1", ["videoar.rope=flat"],
                                                                        ["flip_end=0.25"])
    assert [parse_arm(a)[0] for a in PAPER_ARMS] == ["baseline", "mst_rope", "time_corruption", "error_inheritance"]
    for bad in ("no colon", "x: novalue", ": a=1"):
        with pytest.raises(ValueError):
            parse_arm(bad)


@pytest.mark.slow
def test_two_arms_train_evaluate_and_are_reused(clips_dir, tokenizer_ckpt, tmp_path, capsys):
    cfg = load_config(None, TINY + VIDEOAR + [
        f"data.clips_dir={clips_dir}", "data.synth_clips=8", "data.synth_frames=13", "videoar.cond=text",
        "videoar.text_len=8", f"videoar_train.tokenizer_ckpt={tokenizer_ckpt}", "videoar_train.eval_every=2",
        "curriculum=[{name: s, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], global_batch: 2, "
        "micro_batch: 2}]"])
    save_config(cfg, tmp_path / "recipe.yaml")
    out = tmp_path / "ablation"
    argv = ["--config", str(tmp_path / "recipe.yaml"), "--out", str(out), "--captions", "2", "--drift-clips", "1",
            *(a for arm in ARMS for a in ("--arm", arm))]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| flat |" in printed and "| temporal |" in printed
    result = json.loads((out / "ablation.json").read_text())
    for name in ("flat", "temporal"):
        row = result["arms"][name]
        assert row["step"] == 2 and row["quality/videos"] == 2 and 0 <= row["quality/direction"] <= 1
        assert row["eval/loss"] > 0 and len(row["drift"]) == 9 and row["quality/drift_end"] == row["drift"][-1]
    flat = load_config(out / "flat" / "videoar" / "config.yaml")
    temporal = load_config(out / "temporal" / "videoar" / "config.yaml")
    assert (flat.videoar.rope, temporal.videoar.rope) == ("flat", "temporal")
    assert (flat.curriculum[0].flip_end, temporal.curriculum[0].flip_end) == (0.0, 0.2)
    assert (flat.curriculum[0].p_mask, temporal.curriculum[0].p_mask) == (0.0, 0.5)
    assert flat.run.seed == temporal.run.seed and flat.data == temporal.data  # same data, seed and budget
    # the same data and tokenizer: the second arm reused the first arm's encoded latents
    assert sorted(p.name for p in (out / "temporal" / "videoar" / "latents").iterdir()) == \
        sorted(p.name for p in (out / "flat" / "videoar" / "latents").iterdir())
    losses = [r["loss"] for r in read_jsonl(out / "flat" / "videoar" / "metrics.jsonl") if "loss" in r]
    assert main(argv) == 0  # finished arms are reused: no new training step is logged, same numbers
    assert [r["loss"] for r in read_jsonl(out / "flat" / "videoar" / "metrics.jsonl") if "loss" in r] == losses
    again = json.loads((out / "ablation.json").read_text())
    assert again["arms"]["flat"]["eval/loss"] == result["arms"]["flat"]["eval/loss"]
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "recipe.yaml"), "--out", str(out), "--arm", "x: stages.nokey=1"])
