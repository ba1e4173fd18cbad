"""The capacity planner (parallel/plan.py, parallel/plan_model.py): its parameter count is the real model's, its
ZeRO bytes are the closed forms, its FLOPs the trainer's, its rules reject what the config rejects, and on a tiny
2-rank run its bytes equal those counted at the collectives and its memory the measured peak within 15%."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.plan_validation import validate
from benchmarks.zero_memory import theory
from common.config import load_config
from common.job_config import ParallelConfig
from common.model_config import VideoARConfig
from common.parallel_plan import tp_split_dim
from models.layout import SequenceLayout
from models.videoar import VideoAR
from parallel import plan as planner
from parallel.plan_model import Layout, Precision, Shape, model_params, rank_params, state_bytes, step_flops
from trainer.flops import train_step_flops

def _meta_model(cfg: VideoARConfig, latent: int) -> VideoAR:
    with torch.device("meta"):
        return VideoAR(cfg, latent)


@pytest.mark.parametrize("preset, prev_frame", [("tiny", False), ("tiny", True), ("small", False), ("L", False),
                                                ("XL", False), ("4B", False)])
def test_parameter_count_is_the_models(preset, prev_frame):
    cfg = VideoARConfig(preset=preset, text_len=64, prev_frame_input=prev_frame)
    model = _meta_model(cfg, 48)
    assert model_params(cfg, 48) == sum(p.numel() for p in model.parameters())
    split = model.parallel_plan().tp_split
    for tp in (2, 4):  # a tp rank: the plan's split layers divided, the rest replicated
        want = sum(p.numel() // (tp if tp_split_dim(n, split) is not None else 1) for n, p in model.named_parameters())
        assert rank_params(cfg, 48, tp=tp) == want


def test_class_condition_and_pipeline_stage_counts():
    cfg = VideoARConfig(preset="custom", depth=5, width=64, heads=4, cond="class", num_classes=7, qk_norm=False)
    model = _meta_model(cfg, 16)
    assert model_params(cfg, 16) == sum(p.numel() for p in model.parameters())
    blocks = ParallelConfig(pp=2).blocks_per_stage(cfg.depth)  # [3, 2]: stage 0 holds 3 blocks + embeddings
    plan = model.parallel_plan()
    stage0 = sum(p.numel() for n, p in model.named_parameters()
                 if n.split(".")[0] in plan.first_stage or (n.startswith("blocks.") and int(n.split(".")[1]) < blocks[0]))
    assert rank_params(cfg, 16, pp=2) == stage0


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_bytes_are_the_closed_forms(zero):
    psi, dp, cp = 1_000_000, 4, 2
    lay = Layout(dp=dp, cp=cp, zero=zero)
    n = dp * cp
    bf16 = state_bytes(psi, lay, Precision("bf16", "bf16"))
    if zero == 0:  # the torch engine: fp32 weights, gradients, Adam m and v
        assert bf16 == {"parameters": 4 * psi, "gradients": 4 * psi, "optimizer": 8 * psi}
    else:  # the ZeRO paper's Table 1, as benchmarks/zero_memory.py's theory
        want_states, want_grads = theory(zero, "bf16", n, psi)
        assert bf16["parameters"] + bf16["optimizer"] == pytest.approx(want_states)
        assert bf16["gradients"] == pytest.approx(want_grads)
        fp32_accum = state_bytes(psi, lay, Precision("bf16", "fp32"))
        extra = 4 * psi if zero == 1 else 4 * psi / n  # ZeRO-1's BF16_Optimizer: fp32 grads of the whole model
        assert fp32_accum["gradients"] - bf16["gradients"] == pytest.approx(extra)


def test_step_flops_are_the_trainers():
    cfg = VideoARConfig(preset="small", text_len=16)
    shapes = [Shape("v", 16, 5, ((1, 1), (2, 2), (4, 4)), 8, 2), Shape("i", 16, 1, ((1, 1), (3, 3)), 4)]
    want = sum(train_step_flops(cfg, 16, SequenceLayout(s.prefix_len, s.num_frames, s.sizes), s.global_batch,
                                "useful", s.window) for s in shapes)
    assert step_flops(cfg, 16, shapes) == want
    dense = sum(train_step_flops(cfg, 16, SequenceLayout(s.prefix_len, s.num_frames, s.sizes), s.global_batch)
                for s in shapes)
    assert step_flops(cfg, 16, shapes, attention="sdpa") == dense > want


def test_rules_reject_what_the_config_rejects():
    cfg = load_config("configs/videoar_xl.yaml")
    shapes = planner.stage_shapes(cfg)["III"]
    assert [s.length for s in shapes] == [64 + 13 * 655]
    problem = lambda **kw: planner.layout_problem(cfg, shapes, Layout(**kw))  # noqa: E731
    assert problem(tp=2, dp=32) is None
    assert problem(tp=32, dp=2) == "heads or MLP width % tp"
    assert problem(pp=2, cp=2, dp=16) == "cp needs pp = 1"
    assert problem(pp=2, zero=1, dp=32) == "ZeRO needs pp = 1"
    assert problem(tp=2, cp=16, dp=2) == "heads / tp % cp"
    assert problem(cp=2, dp=32) == "sequence length % cp"  # 8,579 tokens
    assert problem(dp=64, micro_batch=8) == "batch % (dp x micro-batch)"  # 256 / 64 = 4 per rank


def test_plan_ranks_the_xl_config_and_prints_json(capsys):
    assert planner.main(["--config", "configs/videoar_xl.yaml", "--gpus", "64", "--json", "--stage", "III"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = load_config("configs/videoar_xl.yaml")
    assert out["parameters"] == model_params(cfg.videoar, 48) == sum(p.numel() for p in _meta_model(cfg.videoar, 48).parameters())
    stage = out["stages"]["III"]
    rows = stage["feasible"]
    times = [r["time"]["total"] for r in rows]
    assert rows and times == sorted(times)
    assert all(r["memory"]["total"] <= 0.9 * 80e9 for r in rows) and stage["rejected"]
    assert stage["configured_rank"] is not None  # tp2 ZeRO-2 with checkpointing fits 80 GB at 49 frames
    for r in rows:
        assert r["layout"]["tp"] * r["layout"]["pp"] * r["layout"]["cp"] * r["layout"]["dp"] == 64


@pytest.mark.slow
def test_bytes_and_memory_match_a_two_rank_run(tmp_path):
    """Tiny VideoAR, 2 gloo ranks: tp = 2, cp = 2, dp = 2 (torch engine and ZeRO-2) bytes equal those counted at the
    collectives; every layout's peak memory within 15% of the prediction."""
    sizes = {"depth": 2, "width": 128, "heads": 4, "frames": 3, "micro_batch": 2}
    rows = validate(sizes, ["single", "tp2", "cp2", "dp2", "zero2"], str(tmp_path))
    for name in ("tp2", "dp2", "zero2"):
        assert rows[name]["measured"]["large"] == pytest.approx(rows[name]["predicted"]["bytes"], rel=1e-6), name
    # cp: the all-to-alls exactly; the total besides carries cp's loss-statistics reduction (~3 KB)
    cp, ops = rows["cp2"]["predicted"], rows["cp2"]["measured"]["ops"]
    assert ops["_c10d_functional.all_to_all_single.default"][1] == pytest.approx(cp["by_dim"]["cp"], rel=1e-6)
    assert ops["_c10d_functional.all_to_all_single.default"][0] == 2 * 2 * 8  # 2 blocks x 2 micro x (4 fwd + 4 bwd)
    assert rows["cp2"]["measured"]["large"] == pytest.approx(cp["bytes"], rel=1e-3)
    for name, r in rows.items():
        assert r["measured"]["peak"] == pytest.approx(r["predicted"]["memory"]["total"], rel=0.15), name
