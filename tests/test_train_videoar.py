"""VideoAR training: exact resume across a curriculum stage switch, curriculum checks, overfitting + greedy sampling."""

from __future__ import annotations

import pytest
import torch

from models.sampler import SamplingConfig, sample
from tests.conftest import make_cfg
from trainer.train_videoar import VideoARTrainer, train_videoar

TWO_STAGES = ("curriculum=[{name: low, until_step: 3, resolution: [16, 16], frames: 5, scales: [1, 2], "
              "global_batch: 4, micro_batch: 2, flip_start: 0.1, flip_end: 0.3}, "
              "{name: high, until_step: 6, resolution: [32, 32], frames: 5, scales: [1, 2, 4], global_batch: 2, "
              "micro_batch: 1, flip_start: 0.2, flip_end: 0.2, p_mask: 0.3, window: 1}]")


@pytest.mark.parametrize("stop", [2, 3])  # inside the first stage; exactly at the stage switch
def test_resume_equals_uninterrupted_run_across_a_stage_switch(clips_dir, tokenizer_ckpt, tmp_path, stop):
    whole = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "whole", TWO_STAGES), progress=False)
    ref = whole.train()
    assert ref.step == 6 and len(ref.losses) == 6

    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "split", TWO_STAGES)
    first = train_videoar(cfg, progress=False, max_steps=stop)
    resumed = VideoARTrainer(cfg, progress=False)
    second = resumed.train()
    assert second.start_step == stop
    assert first.losses + second.losses == ref.losses  # exact: fp32, CPU, same RNG streams
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.loader.consumed == whole.loader.consumed == [12, 6]


def test_resume_refuses_a_changed_curriculum(clips_dir, tokenizer_ckpt, tmp_path):
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, TWO_STAGES)
    train_videoar(cfg, progress=False, max_steps=2)
    changed = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, TWO_STAGES.replace("global_batch: 4", "global_batch: 2"))
    with pytest.raises(ValueError, match="curriculum mismatch at step 2"):
        VideoARTrainer(changed, progress=False).train()


@pytest.mark.parametrize("weighting", ["none", "sqrt_area"])
def test_metrics_report_stage_flip_and_breakdowns(clips_dir, tokenizer_ckpt, tmp_path, weighting):
    """The logged loss is the optimized one: with `sqrt_area` a token of scale k weighs sqrt(H*W / (h_k*w_k))
    (normalized to mean 1); the per-scale losses stay plain means, so the total is their weighted mean."""
    import json
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, TWO_STAGES, f"videoar_train.scale_loss_weight={weighting}")
    run = train_videoar(cfg, progress=False)
    recs = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in recs] == ["low"] * 3 + ["high"] * 3
    assert [r["flip_p_max"] for r in recs] == pytest.approx([0.1, 0.2, 0.3, 0.2, 0.2, 0.2])
    assert {"loss_scale1", "loss_frame1", "bit_acc", "grad_norm", "lr", "tokens_per_s"} <= set(recs[0])
    assert "loss_scale2" not in recs[0] and "loss_scale2" in recs[-1]  # the scale schedule grew at the switch
    for r in recs:  # the per-scale losses are token-weighted parts of the total
        sizes = [1, 4] if r["stage"] == "low" else [1, 4, 16]
        w = [(sizes[-1] / n) ** 0.5 if weighting == "sqrt_area" else 1.0 for n in sizes]
        total = sum(r[f"loss_scale{k}"] * n * w[k] for k, n in enumerate(sizes)) / sum(n * wk for n, wk in zip(sizes, w))
        assert total == pytest.approx(r["loss"], rel=1e-5)


def test_scale_loss_weights_and_the_weighted_bit_loss():
    from models.layout import SequenceLayout
    from models.objective import bit_loss, scale_loss_weights

    layout = SequenceLayout(prefix_len=3, num_frames=2, sizes=((1, 1), (2, 2), (4, 4)))
    assert scale_loss_weights(layout, "none") is None
    w = scale_loss_weights(layout, "sqrt_area")
    per_frame = [4.0] + [2.0] * 4 + [1.0] * 16  # sqrt(16 / area) per token of one frame
    assert torch.allclose(w, torch.tensor(per_frame * 2) * 42 / 56)  # 2 frames x 21 tokens, raw sum 2 x 28
    logits, targets = torch.randn(2, 42, 5, 2), torch.rand(2, 42, 5) > 0.5
    plain, tl, tc = bit_loss(logits, targets)
    same, tl1, tc1 = bit_loss(logits, targets, torch.ones(42))
    weighted, tl2, _ = bit_loss(logits, targets, w)
    assert torch.allclose(plain, same) and torch.equal(tl, tl1) and torch.equal(tc, tc1) and torch.equal(tl, tl2)
    assert torch.allclose(weighted, (tl / 2 * w).mean())  # tl: per-token bit-mean loss summed over the batch
    with pytest.raises(ValueError, match="scale_loss_weight: 'cubic' is not one of"):
        scale_loss_weights(layout, "cubic")
    # motion weight: scales 1..motion_scales of frames after the first, on top of the per-scale weight
    m = scale_loss_weights(layout, "none", 5.0, 1)
    raw = torch.tensor([1.0] * 21 + [1.0] + [5.0] * 4 + [1.0] * 16)  # frame 0 untouched; frame 1's 2x2 scale x5
    assert torch.allclose(m, raw * 42 / raw.sum())
    both = scale_loss_weights(layout, "sqrt_area", 3.0, 2)
    raw = torch.tensor(per_frame + [4.0] + [6.0] * 4 + [3.0] * 16)  # frame 1: scales 1 and 2 tripled
    assert torch.allclose(both, raw * 42 / raw.sum())
    assert scale_loss_weights(layout, "none", 1.0, 2) is None
    # first-frame weight: scales 0..motion_scales of frame 0 only
    f = scale_loss_weights(layout, "none", 1.0, 1, 4.0)
    raw = torch.tensor([4.0] * 5 + [1.0] * 16 + [1.0] * 21)  # frame 0's 1x1 and 2x2 scales x4
    assert torch.allclose(f, raw * 42 / raw.sum())


def test_motion_loss_weight_reaches_the_objective(clips_dir, tokenizer_ckpt, tmp_path, monkeypatch):
    """videoar_train.motion_loss_weight/_scales are what the trainer's objective weighs tokens by; bad values are
    refused by name."""
    import trainer.train_videoar as tv
    from common.validation import ConfigError
    seen = []
    real = tv.scale_loss_weights
    monkeypatch.setattr(tv, "scale_loss_weights", lambda *a: seen.append(a[1:]) or real(*a))
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, TWO_STAGES, "videoar_train.motion_loss_weight=4",
                   "videoar_train.motion_loss_scales=1", "videoar_train.first_frame_loss_weight=3")
    train_videoar(cfg, progress=False, max_steps=1)
    assert seen and set(seen) == {("none", 4.0, 1, 3.0)}
    with pytest.raises(ConfigError, match="motion_loss_weight"):
        make_cfg(clips_dir, tokenizer_ckpt, tmp_path, TWO_STAGES, "videoar_train.motion_loss_weight=0")
    with pytest.raises(ConfigError, match="first_frame_loss_weight"):
        make_cfg(clips_dir, tokenizer_ckpt, tmp_path, TWO_STAGES, "videoar_train.first_frame_loss_weight=-1")
    # a stage's own weight wins over videoar_train's: stage "low" (steps 1-3) 6, stage "high" the global 4
    seen.clear()
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "staged", TWO_STAGES, "videoar_train.motion_loss_weight=4",
                   "curriculum.0.motion_loss_weight=6")
    train_videoar(cfg, progress=False, max_steps=4)
    assert set(seen) == {("none", 6.0, 2, 1.0), ("none", 4.0, 2, 1.0)} and seen[0] == ("none", 6.0, 2, 1.0) \
        and seen[-1] == ("none", 4.0, 2, 1.0)
    with pytest.raises(ConfigError, match=r"curriculum\[low\].motion_loss_weight"):
        make_cfg(clips_dir, tokenizer_ckpt, tmp_path, TWO_STAGES, "curriculum.0.motion_loss_weight=-1")


def test_overfit_then_greedy_sampling_reproduces_training_bits(clips_dir, tokenizer_ckpt, tmp_path):
    """Six clips, one class each, no condition dropout or bit flips: the loss must fall far below ln 2 and
    greedy sampling with cfg 1 must rebuild the clips' bits."""
    stage = ("curriculum=[{name: fit, until_step: 250, resolution: [32, 32], frames: 9, scales: [1, 2, 4], "
             "global_batch: 6, micro_batch: 6}]")
    cfg = make_cfg(clips_dir, tokenizer_ckpt, tmp_path, stage, "videoar.width=64", "videoar.heads=4",
                   "videoar.cond_drop=0.0", "videoar_train.lr=3e-3", "videoar_train.weight_decay=0.0",
                   "videoar_train.log_every=50", "videoar_train.ckpt_every=1000")
    trainer = VideoARTrainer(cfg, progress=False)
    run = trainer.train()
    assert run.losses[0] == pytest.approx(0.6931, abs=1e-3)  # zero-initialised head: p = 1/2 per bit
    assert sum(run.losses[-10:]) / 10 < 0.05
    data, q = trainer.loader.datasets[0], trainer.quantizer
    assert len(data) == 6
    latents, classes = data.batch(list(range(6)))
    truth = [torch.stack([q.encode(latents[:, t])[k] for t in range(latents.shape[1])], 1)
             for k in range(q.num_scales)]
    trainer.model.eval()
    res = sample(trainer.model, q, classes, latents.shape[1], SamplingConfig(cfg_scale=1.0, temperature=0.0))
    acc = torch.cat([(a == b).flatten() for a, b in zip(res.bits, truth)]).float().mean().item()
    print(f"overfit: last loss {run.losses[-1]:.4f}, greedy bit accuracy {acc:.4f}")
    assert acc > 0.97, acc


def test_gradient_accumulation_matches_one_big_micro_batch(clips_dir, tokenizer_ckpt, tmp_path):
    """Random draws are per sample (flips, frame mask, condition dropout all on): 2 x 2 accumulated == 1 x 4
    (fp32 summation order only: losses 1e-6). Weights: each tensor's difference is under 1% of the update the two
    steps made to it (Frobenius norms). Not elementwise: Adam's first step moves a weight by lr * g / (|g| + eps),
    so a weight whose gradient is ~eps moves by up to lr for a summation-order change of g (measured: 2e-5 on one
    of 3,072 elements after the data changed)."""
    def stage(micro):
        return (f"curriculum=[{{name: s, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
                f"global_batch: 4, micro_batch: {micro}, flip_start: 0.2, flip_end: 0.3, p_mask: 0.3}}]")
    runs, init = [], None
    for micro in (4, 2):
        t = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / str(micro), stage(micro)),
                           progress=False)
        init = init or {k: v.clone() for k, v in t.model.state_dict().items()}
        runs.append((t.train().losses, t.model.state_dict()))
    (l4, s4), (l2, s2) = runs
    assert l4 == pytest.approx(l2, abs=1e-6)
    for k in s4:
        update = (s4[k] - init[k]).norm()
        if update > 0:
            assert (s4[k] - s2[k]).norm() <= 1e-2 * update, k
        else:
            assert torch.equal(s4[k], s2[k]), k


def test_bf16_autocast_trains_close_to_fp32(clips_dir, tokenizer_ckpt, tmp_path):
    stage = ("curriculum=[{name: s, until_step: 4, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
             "global_batch: 2, micro_batch: 2}]")
    fp32 = train_videoar(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "a", stage), progress=False).losses
    bf16 = train_videoar(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "b", stage, "videoar_train.precision=bf16"),
                         progress=False).losses
    assert fp32 == pytest.approx(bf16, abs=5e-3) and fp32 != bf16


def test_activation_checkpointing_changes_memory_not_results(clips_dir, tokenizer_ckpt, tmp_path):
    stage = ("curriculum=[{name: s, until_step: 3, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
             "global_batch: 2, micro_batch: 2, flip_start: 0.2, flip_end: 0.2, p_mask: 0.3}]")
    runs = []
    for ckpt in (False, True):
        t = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / str(ckpt), stage,
                                    f"parallel.activation_checkpointing={ckpt}"), progress=False)
        runs.append((t.train().losses, t.model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].values(), runs[1][1].values()))


def test_heldout_evaluation_is_plain_teacher_forcing_on_unseen_clips_and_leaves_training_alone(
        clips_dir, tokenizer_ckpt, tmp_path):
    """eval/* every 2 steps: ln 2 for the zero-initialised head, the per-scale parts add up, the held-out windows
    come from the 2 held-out clips only, and the training losses equal a run without evaluation (bit-exact)."""
    import json
    import math

    from trainer.evaluate import eval_count

    plain = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "plain", TWO_STAGES), progress=False)
    reference = plain.train().losses
    trainer = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "eval", TWO_STAGES,
                                      "videoar_train.eval_every=2"), progress=False)
    first = trainer.evaluate()  # before any step: p = 1/2 for every bit
    assert first["eval/loss"] == pytest.approx(math.log(2), rel=1e-6) and first["eval/samples"] == 4
    held, train = trainer.evaluator._data, trainer.loader.datasets[0]
    assert (len(held), len(train)) == (4, 12)  # 2 windows of 5 frames per 13-frame clip; 2 of 8 clips held out
    assert not any(torch.equal(h, t) for h in held.latents for t in train.latents)
    assert trainer.train().losses == reference
    recs = [json.loads(line) for line in (tmp_path / "eval" / "videoar" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in recs if "eval/loss" in r}
    assert sorted(evals) == [2, 4, 6]
    for step, r in evals.items():
        sizes = [1, 4] if r["stage"] == "low" else [1, 4, 16]
        total = sum(r[f"eval/loss_scale{k}"] * n for k, n in enumerate(sizes)) / sum(sizes)
        assert total == pytest.approx(r["eval/loss"], rel=1e-5)
        assert r["eval/loss"] < math.log(2) and 0.5 < r["eval/bit_acc"] < 1
    assert [eval_count(10, 2, 2), eval_count(3, 2, 2), eval_count(1, 2, 2), eval_count(10, 1, 1, limit=3),
            eval_count(7, 2, 4)] == [(8, 2), (2, 1), (0, 0), (3, 1), (6, 3)]


def test_ablation_switches_reach_the_model_and_the_objective(clips_dir, tokenizer_ckpt, tmp_path):
    """videoar.rope=flat builds a flat-RoPE model; videoar_train.flip_inherit=false reaches Cross-Frame Error
    Correction: the same seeded draws give a lower mean flip ratio (a lower floor on each frame's first scale)."""
    import json
    stage = ("curriculum=[{name: s, until_step: 2, resolution: [32, 32], frames: 13, scales: [1, 2, 4], "
             "global_batch: 4, micro_batch: 4, flip_start: 0.2, flip_end: 0.2}]")
    ratios = {}
    for name, extra in (("on", []), ("off", ["videoar.rope=flat", "videoar_train.flip_inherit=false"])):
        trainer = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / name, stage, *extra), progress=False)
        trainer.train()
        recs = (tmp_path / name / "videoar" / "metrics.jsonl").read_text().splitlines()
        ratios[name] = [json.loads(line)["flip_ratio"] for line in recs]
        layout = trainer.model.layout_for(4, trainer.quantizer.sizes)
        first_pair = trainer.model.tensors(layout).angles[:, 0]  # flat: the sequence index; temporal: frame + P
        assert (first_pair.tolist() == list(range(layout.length))) == (name == "off")
    assert len(ratios["on"]) == 2 and all(a > b for a, b in zip(ratios["on"], ratios["off"])), ratios


def test_a_token_budget_trains_like_the_micro_batch_it_resolves_to(clips_dir, tokenizer_ckpt, tmp_path):
    """A stage of 43-token samples (tests/test_observability.py) with micro_batch_tokens=100 runs micro-batches
    of 2 (3 would need 129 tokens), and trains exactly as micro_batch=2 does."""
    def stage(extra):
        return ("curriculum=[{name: s, until_step: 2, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
                f"global_batch: 4, {extra}, flip_start: 0.2, flip_end: 0.3}}]")
    budget = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "a", stage("micro_batch_tokens: 100")),
                            progress=False)
    assert budget.curriculum.stages[0].micro_batch == 2
    fixed = VideoARTrainer(make_cfg(clips_dir, tokenizer_ckpt, tmp_path / "b", stage("micro_batch: 2")),
                           progress=False)
    assert budget.train().losses == fixed.train().losses
