"""Every dp x pp x tp layout (and ZeRO stage) computes the same training run as one process (gloo, CPU).

Each layout trains 3 steps, checkpoints, then a fresh trainer in the same processes resumes and trains steps
4-5. The 5 losses, the held-out evaluation at step 5 and the final weights (tensor-parallel shards concatenated,
pipeline stages merged) must equal an uninterrupted single-process run with Cross-Frame Error Correction, the
Random Frame Mask and condition dropout on: relative 1e-5 on losses and on every weight tensor (Frobenius norm of
the difference) after 5 AdamW steps (only the summation order differs between layouts).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_cfg
from parallel.launch import run_local as run_ranks

STAGE = ("curriculum=[{name: s, until_step: 5, resolution: [32, 32], frames: 5, scales: [1, 2, 4], "
         "global_batch: 4, micro_batch: 1, flip_start: 0.2, flip_end: 0.3, p_mask: 0.3, window: 1}]")
MODEL = ["videoar.depth=4", "videoar.width=32", "videoar.heads=2", "videoar_train.ckpt_every=100",
         "videoar_train.grad_clip=0.05",  # a small clip so clipping is active and must agree across ranks
         "videoar_train.eval_every=5"]  # held-out evaluation at step 5 (and at the end of the 3-step run)


def cfg_for(clips_dir, tokenizer_ckpt, run_dir, tp=1, pp=1, zero=0, *extra):
    return make_cfg(clips_dir, tokenizer_ckpt, run_dir, STAGE, *MODEL, f"parallel.tp={tp}", f"parallel.pp={pp}",
                    f"parallel.zero_stage={zero}", *extra)


def _train_and_resume(rank, world, clips_dir, tokenizer_ckpt, run_dir, tp, pp, zero, out):
    from trainer.train_videoar import VideoARTrainer

    cfg = cfg_for(clips_dir, tokenizer_ckpt, run_dir, tp, pp, zero)
    first = VideoARTrainer(cfg, progress=False)
    losses = first.train(max_steps=3).losses
    second = VideoARTrainer(cfg, progress=False)
    run = second.train()
    topo = second.topo
    torch.save({"losses": losses + run.losses, "start": run.start_step, "state": second.engine.local_model_state(),
                "split": second.plan.tp_split,
                "tp_rank": topo.tp_rank, "pp_rank": topo.pp_rank, "dp_rank": topo.dp_rank}, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def reference(clips_dir, tokenizer_ckpt, tmp_path_factory):
    from trainer.train_videoar import VideoARTrainer

    run_dir = tmp_path_factory.mktemp("single")
    trainer = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, run_dir), progress=False)
    run = trainer.train()
    return run.losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, last_eval(run_dir)


def last_eval(run_dir) -> dict[str, float]:
    """The eval/* losses of the last record that has them (rank 0's metrics)."""
    from common.metrics import read_jsonl

    rec = [r for r in read_jsonl(run_dir / "videoar" / "metrics.jsonl") if "eval/loss" in r][-1]
    return {k: v for k, v in rec.items() if k.startswith("eval/loss") or k in ("step", "eval/samples")}


def merge(results: list[dict]) -> dict[str, torch.Tensor]:
    """Full weights from dp-rank-0 shards: tensor-parallel pieces concatenated along their split dim."""
    from common.parallel_plan import tp_split_dim

    full = {}
    shards = sorted((r for r in results if r["dp_rank"] == 0), key=lambda r: (r["pp_rank"], r["tp_rank"]))
    for name in {k for r in shards for k in r["state"]}:
        parts = [r["state"][name] for r in shards if name in r["state"]]
        dim = tp_split_dim(name, shards[0]["split"])
        full[name] = torch.cat(parts, dim) if dim is not None else parts[0]
    return full


LAYOUTS = [  # (world, tp, pp, zero)
    (2, 2, 1, 0), (2, 1, 2, 0), (2, 1, 1, 0), (2, 1, 1, 1), (2, 1, 1, 2), (2, 1, 1, 3),
    (4, 2, 1, 0), (4, 2, 1, 1), (4, 2, 1, 2), (4, 2, 1, 3), (4, 1, 2, 0), (4, 2, 2, 0),
]


@pytest.mark.slow
@pytest.mark.parametrize("world, tp, pp, zero", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{w // (t * p)}-zero{z}"
                                                              for w, t, p, z in LAYOUTS])
def test_layout_equals_single_process_and_resumes(world, tp, pp, zero, clips_dir, tokenizer_ckpt, tmp_path,
                                                   reference):
    ref_losses, ref_state, ref_eval = reference
    run_ranks(world, _train_and_resume, clips_dir, tokenizer_ckpt, tmp_path / "run", tp, pp, zero, tmp_path)
    got_eval = last_eval(tmp_path / "run")  # held-out loss at step 5: per-token sums added over the dp ranks
    assert got_eval == pytest.approx(ref_eval, rel=1e-5) and ref_eval["step"] == 5 and ref_eval["eval/samples"] == 4
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r in results:
        assert r["start"] == 3
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5)
    full = merge(results)
    assert set(full) == set(ref_state)
    worst = 0.0
    for name, ref in ref_state.items():
        assert full[name].shape == ref.shape, name
        rel = ((full[name] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
        if rel > 1e-5:
            print("DIFF", name, rel)
    print(f"worst relative weight difference: {worst:.2e}")
    assert worst <= 1e-5


WEIGHTED = "videoar_train.scale_loss_weight=sqrt_area"


def _weighted_losses(rank, world, clips_dir, tokenizer_ckpt, run_dir, tp, pp, zero, out):
    from trainer.train_videoar import VideoARTrainer

    run = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, run_dir, tp, pp, zero, WEIGHTED), progress=False).train()
    torch.save({"losses": run.losses}, f"{out}/weighted{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("world, tp, pp, zero", [(2, 1, 2, 0), (2, 1, 1, 1)], ids=["pipeline", "deepspeed"])
def test_per_scale_loss_weights_reach_the_pipeline_and_deepspeed_losses(world, tp, pp, zero, clips_dir,
                                                                        tokenizer_ckpt, tmp_path):
    """With `scale_loss_weight=sqrt_area` the pipeline stage's loss function and the DeepSpeed engine weight the
    tokens like one process: the 5 losses (each a weighted forward after updates from weighted gradients) equal the single-process run to 1e-5. Weights are not compared here: AdamW turns the
    summation-order noise of a near-zero head-bias gradient into ~1e-3 relative on head.bias, even in one
    process when only the micro-batch split changes (measured), while every other tensor agrees to ~1e-5."""
    from trainer.train_videoar import VideoARTrainer

    ref = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, tmp_path / "single", 1, 1, 0, WEIGHTED),
                         progress=False).train().losses
    plain = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, tmp_path / "plain"), progress=False).train().losses
    assert abs(ref[-1] - plain[-1]) > 1e-4  # the weighting changes the run (step 1 is ln 2 for any weights)
    run_ranks(world, _weighted_losses, clips_dir, tokenizer_ckpt, tmp_path / "run", tp, pp, zero, tmp_path)
    for r in range(world):
        assert torch.load(tmp_path / f"weighted{r}.pt", weights_only=True)["losses"] == pytest.approx(ref, rel=1e-5)


def _train_save_and_sample(rank, world, clips_dir, tokenizer_ckpt, run_dir, out):
    from models.sampler import SamplingConfig, sample
    from trainer.train_videoar import VideoARTrainer

    trainer = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, run_dir, tp=2), progress=False)
    trainer.train(max_steps=3)
    q = trainer.tokenizer.quantizer.for_sizes(trainer.curriculum.stages[0].sizes)
    trainer.model.eval()
    res = sample(trainer.model, q, torch.tensor([0, 1]), 2, SamplingConfig(cfg_scale=1.0, temperature=0.0))
    if rank == 0:
        torch.save({"bits": res.bits}, f"{out}/tp_bits.pt")


def _resume(rank, world, clips_dir, tokenizer_ckpt, run_dir, pp, out):
    from trainer.train_videoar import VideoARTrainer

    run = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, run_dir, pp=pp), progress=False).train()
    torch.save({"losses": run.losses, "start": run.start_step}, f"{out}/resumed{rank}.pt")


@pytest.mark.slow
def test_reshard_and_consolidate(clips_dir, tokenizer_ckpt, tmp_path, reference):
    """Save under (tp 2, pp 1, dp 2); resume under (1, 2, 1) and (1, 1, 1) with losses equal to the
    uninterrupted run; the consolidated file samples the same greedy bits as the tensor-parallel model."""
    import shutil

    from models.sampler import SamplingConfig, sample
    from parallel.consolidate import main as consolidate
    from trainer.sample import load_videoar
    from data_pipeline.tokenizer_ckpt import load_tokenizer
    from trainer.train_videoar import VideoARTrainer

    ref_losses, _, _ = reference
    run_ranks(4, _train_save_and_sample, clips_dir, tokenizer_ckpt, tmp_path / "a", tmp_path)
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    run_ranks(2, _resume, clips_dir, tokenizer_ckpt, tmp_path / "a", 2, tmp_path)
    for r in range(2):
        got = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        assert got["start"] == 3 and got["losses"] == pytest.approx(ref_losses[3:], rel=1e-5)

    single = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, tmp_path / "b"), progress=False).train()
    assert single.start_step == 3 and single.losses == pytest.approx(ref_losses[3:], rel=1e-5)

    out = tmp_path / "model.safetensors"
    assert consolidate(["--ckpt", str(tmp_path / "b" / "videoar" / "checkpoints"), "--step", "3",
                        "--out", str(out)]) == 0
    model, cfg, step = load_videoar(out)
    assert step == 3
    tok, _, _ = load_tokenizer(tokenizer_ckpt)
    q = tok.quantizer.for_sizes(cfg.curriculum[0].sizes)
    bits = sample(model, q, torch.tensor([0, 1]), 2, SamplingConfig(cfg_scale=1.0, temperature=0.0)).bits
    tp_bits = torch.load(tmp_path / "tp_bits.pt", weights_only=True)["bits"]
    assert all(torch.equal(a, b) for a, b in zip(bits, tp_bits))
    assert 0.05 < torch.cat([b.flatten() for b in bits]).float().mean() < 0.95  # not a trivial all-0/1 sample


def _startup_bytes(rank, world, clips_dir, tokenizer_ckpt, run_dir, out):
    from trainer.train_videoar import VideoARTrainer

    trainer = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, run_dir, 1, 2, 0), progress=False)
    real = {n: p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if not p.is_meta}
    stage = {n: p.numel() * p.element_size() for n, p in trainer.engine.module.named_parameters()}
    torch.save({"real": real, "stage": stage, "pp_rank": trainer.topo.pp_rank,
                "values": {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}},
               f"{out}/startup{rank}.pt")


@pytest.mark.slow
def test_pipeline_ranks_build_only_their_stage(clips_dir, tokenizer_ckpt, tmp_path):
    """pp = 2: each rank allocates only its stage's parameters (the rest of the model stays on the meta device):
    bytes counted per rank equal its stage's, the two ranks' sets are disjoint and together the whole model,
    and the values equal a single-process model's (per-parameter seeded initialization)."""
    from trainer.train_videoar import VideoARTrainer

    run_ranks(2, _startup_bytes, clips_dir, tokenizer_ckpt, tmp_path / "run", tmp_path)
    ranks = sorted((torch.load(tmp_path / f"startup{r}.pt", weights_only=True) for r in range(2)),
                   key=lambda r: r["pp_rank"])
    single = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, tmp_path / "single"), progress=False).model
    full = {n: p.numel() * p.element_size() for n, p in single.named_parameters()}
    for r in ranks:
        assert r["real"] == r["stage"] and 0 < sum(r["real"].values()) < sum(full.values())
        for name, value in r["values"].items():
            assert torch.equal(value, single.get_parameter(name).detach()), name
    assert not set(ranks[0]["real"]) & set(ranks[1]["real"])
    assert {**ranks[0]["real"], **ranks[1]["real"]} == full
    assert "class_embed.weight" in ranks[0]["real"] and "head.weight" in ranks[1]["real"]


def _train_under(rank, world, clips_dir, tokenizer_ckpt, run_dir, tp, pp, zero, max_steps, out):
    """Train (or resume) under one layout; rank files report losses, the resume's bytes and the final weights."""
    from parallel.dcp_format import DCP_DIR
    from trainer.train_videoar import VideoARTrainer

    trainer = VideoARTrainer(cfg_for(clips_dir, tokenizer_ckpt, run_dir, tp, pp, zero), progress=False)
    run = trainer.train(max_steps=max_steps)
    topo, ckpt = trainer.topo, trainer.checkpoints
    step = ckpt.last or ckpt.root / "step-00000003"
    dcp_bytes = sum(f.stat().st_size for f in (step / DCP_DIR).iterdir())
    torch.save({"losses": run.losses, "start": run.start_step, "state": trainer.engine.local_model_state(),
                "split": trainer.plan.tp_split, "tp_rank": topo.tp_rank, "pp_rank": topo.pp_rank,
                "dp_rank": topo.dp_rank, "bytes_read": ckpt.bytes_read, "dcp_bytes": dcp_bytes},
               f"{out}/{max_steps or 'end'}-{rank}.pt")


RESHARDS = [  # (saved layout, resumed layout) as (world, tp, pp, zero)
    ((2, 1, 1, 2), (1, 1, 1, 0)), ((2, 1, 1, 2), (2, 2, 1, 2)), ((2, 1, 1, 1), (4, 2, 2, 0)),
    ((4, 2, 2, 0), (2, 1, 1, 3)),
]


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", RESHARDS, ids=[f"w{a[0]}-tp{a[1]}-pp{a[2]}-zero{a[3]}-to-w{b[0]}-tp{b[1]}"
                                                          f"-pp{b[2]}-zero{b[3]}" for a, b in RESHARDS])
def test_a_checkpoint_resumes_under_another_layout(saved, resumed, clips_dir, tokenizer_ckpt, tmp_path, reference):
    """3 steps under one layout (ZeRO 0-3), steps 4-5 resumed under another from its DCP checkpoint: losses and
    final weights equal the uninterrupted single-process run (rel 1e-5). A rank reads the saved chunks of its own
    slices plus 1/world of the files to verify their checksums: under 4 ranks that split the model (tp 2 x pp 2)
    about 2/4 of the checkpoint's bytes each (the format-2 path read every shard and verified every file: 2.0)."""
    ref_losses, ref_state, _ = reference
    (w0, tp0, pp0, z0), (w1, tp1, pp1, z1) = saved, resumed
    run_ranks(w0, _train_under, clips_dir, tokenizer_ckpt, tmp_path / "run", tp0, pp0, z0, 3, tmp_path)
    if w1 == 1:
        _train_under(0, 1, clips_dir, tokenizer_ckpt, tmp_path / "run", tp1, pp1, z1, None, tmp_path)
    else:
        run_ranks(w1, _train_under, clips_dir, tokenizer_ckpt, tmp_path / "run", tp1, pp1, z1, None, tmp_path)
    results = [torch.load(tmp_path / f"end-{r}.pt", weights_only=True) for r in range(w1)]
    for r in results:
        assert r["start"] == 3 and r["losses"] == pytest.approx(ref_losses[3:], rel=1e-5)
        share = r["bytes_read"] / r["dcp_bytes"]  # its slices' chunks + 1/w1 of the files verified
        split = (tp1, pp1) == (2, 2)  # each rank holds a quarter; ZeRO targets read whole parameters
        assert share <= (2 / w1 if split else 1 + 1 / w1) + 0.15, share
    full = merge(results)
    assert set(full) == set(ref_state)
    for name, ref in ref_state.items():
        assert ((full[name] - ref).norm() / ref.norm().clamp_min(1e-12)).item() <= 1e-5, name
