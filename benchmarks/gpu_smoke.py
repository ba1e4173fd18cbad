"""GPU smoke test, ready for the day a GPU is there: one unattended run (<= ~8 min on one GPU) and one summary table.

    python -m benchmarks.gpu_smoke                  # on a GPU node: everything below
    python -m benchmarks.gpu_smoke --device cpu --quick   # the same code path on a CPU, tiny sizes (CI runs this)

1. `pytest -m gpu` (tests/test_gpu.py: CUDA results equal the CPU's, NCCL collectives with >= 2 GPUs);
2. bf16 train steps (CFEC batch preparation + forward + backward + AdamW through the ZeRO-0 engine) of the demo
   model and of VideoAR-L at ~8k tokens per sample with activation checkpointing: tokens/s, MFU against the GPU's
   datasheet peak (trainer/flops.py), peak memory;
3. KV-cached sampling of the demo model (5 latent frames): blocks/s;
4. with >= 2 GPUs: one tp=2 and one dp=2 train step on NCCL (2 processes).
Exit status: 0 when every row passed, 1 otherwise, 2 without a CUDA device (unless --device cpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.config import load_config
from models.objective import BitObjective, prepare_batch, sample_generator
from models.quantizer import MultiScaleBitwiseQuantizer
from models.sampler import SamplingConfig, sample
from models.videoar import VideoAR
from parallel.launch import run_local
from parallel.parallelize import parallelize
from parallel.topology import SINGLE, init_topology, rank_device
from trainer.curriculum import Curriculum
from trainer.flops import measure_peak_flops, train_step_flops
from trainer.step_metrics import clock

ROOT = Path(__file__).resolve().parents[1]
# (name, preset, frames, scales): L_8k is 6 latent frames x (1+4+16+64+256+1024) = 8190 video tokens per sample
CASES = {"demo": ("tiny", 3, [1, 2, 4, 8]), "L_8k": ("L", 6, [1, 2, 4, 8, 16, 32])}
QUICK = {"demo": ("tiny", 2, [1, 2, 4]), "L_8k": ("tiny", 2, [1, 2, 4, 8])}


def _config(preset: str, scales: list[int], device: str, extra: list[str] = (), frames: int = 3):
    """The demo config with the model preset, a latent grid of scales[-1] (8x spatial compression) and one
    curriculum stage of `frames` latent frames (4x temporal compression: 1 + 4 (frames - 1) video frames)."""
    res, video_frames = 8 * scales[-1], 1 + 4 * (frames - 1)
    stage = (f"curriculum=[{{name: smoke, until_step: 100, resolution: [{res}, {res}], frames: {video_frames}, "
             f"scales: {scales}, global_batch: 1, micro_batch: 1, flip_start: 0.2, flip_end: 0.2}}]")
    return load_config(ROOT / "configs" / "demo.yaml",
                       [f"videoar.preset={preset}", f"quantizer.scales={scales}", f"data.resolution=[{res},{res}]",
                        "tokenizer.spatial_compression=8", "tokenizer.channel_mult=[1,2,4]",
                        f"data.frames={video_frames}", stage, f"run.device={device}",
                        "videoar_train.precision=" + ("bf16" if device == "cuda" else "fp32"), *extra])


def _engine_step(cfg, frames: int, scales: list[int], batch: int, topo, device, steps: int):
    """(seconds per step, video tokens per step, model FLOPs per step) of the real engine on random latents."""
    torch.manual_seed(0)
    model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim)
    model.checkpoint_blocks = cfg.parallel.activation_checkpointing
    plan = model.parallel_plan()
    engine = parallelize(model.to(device), plan, topo, cfg.parallel, cfg.videoar_train, 100, device, batch, 1)
    q = MultiScaleBitwiseQuantizer(cfg.tokenizer.latent_dim, cfg.quantizer).to(device)
    h, w = q.sizes[-1]
    layout = model.layout_for(frames, q.sizes)
    stage = dataclasses.replace(Curriculum(cfg.curriculum).stages[-1], p_mask=0.1)
    latents = torch.randn(batch, frames, q.dim, h, w, device=device)
    cond = torch.randn(batch, cfg.videoar.text_len, cfg.videoar.text_dim, device=device) \
        if cfg.videoar.cond == "text" else torch.zeros(batch, dtype=torch.long, device=device)
    objective = BitObjective(layout.length - layout.prefix_len)
    times = []
    for step in range(steps + 1):  # the first step warms up (allocator, kernels)
        t0 = clock(device)
        gens = [sample_generator(0, step, j) for j in range(batch)]
        micro = prepare_batch(q, layout, latents, cond, stage, 0.1, 0.2, 0.0, 0.01, gens)
        engine.forward_backward([(micro.split(1), objective)])
        engine.step()
        times.append(clock(device) - t0)
    tokens = batch * (layout.length - layout.prefix_len)
    return min(times[1:]), tokens, train_step_flops(cfg.videoar, cfg.tokenizer.latent_dim, layout, batch)


def _train_row(name: str, case, device: torch.device, peak: float) -> dict:
    preset, frames, scales = case
    cfg = _config(preset, scales, device.type, ["parallel.activation_checkpointing=true"], frames)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, tokens, flops = _engine_step(cfg, frames, scales, 1, SINGLE, device, steps=3)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"check": f"train {name} ({preset}, {tokens} tokens)", "ok": True, "tokens/s": tokens / seconds,
            "MFU": flops / seconds / peak, "peak GiB": mem, "note": f"{seconds * 1e3:.0f} ms/step"}


def _sampling_row(device: torch.device) -> dict:
    cfg = _config("tiny", [1, 2, 4, 8], device.type)
    torch.manual_seed(0)
    model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim).to(device).eval()
    q = MultiScaleBitwiseQuantizer(cfg.tokenizer.latent_dim, cfg.quantizer).to(device)
    cond = torch.randn(2, cfg.videoar.text_len, cfg.videoar.text_dim, device=device)
    t0 = clock(device)
    res = sample(model, q, cond, 5, SamplingConfig(cfg_scale=3.0), generator=torch.Generator().manual_seed(0))
    seconds = clock(device) - t0
    ok = res.forwards == 5 * q.num_scales and bool(torch.isfinite(res.latent).all())
    return {"check": "KV-cached sampling (demo, 5 frames)", "ok": ok, "tokens/s": float("nan"), "MFU": float("nan"),
            "peak GiB": float("nan"), "note": f"{res.forwards / seconds:.0f} blocks/s"}


def _nccl_worker(rank, world, layout: str, out: str):
    cfg = _config("tiny", [1, 2, 4, 8], "cuda", [f"parallel.{layout}=2"] if layout == "tp" else [])
    topo = init_topology(cfg.parallel, "cuda")
    seconds, _, _ = _engine_step(cfg, 3, [1, 2, 4, 8], 2 * topo.dp, topo, rank_device("cuda"), steps=2)
    if rank == 0:
        Path(out).write_text(f"{seconds:.4f}")


def _nccl_row(layout: str, tmp: Path) -> dict:
    out = tmp / f"nccl-{layout}.txt"
    try:
        run_local(2, _nccl_worker, layout, str(out))
        ok, note = out.is_file(), f"{float(out.read_text()) * 1e3:.0f} ms/step" if out.is_file() else "no result"
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        ok, note = False, str(e).splitlines()[-1][:60] if str(e) else type(e).__name__
    return {"check": f"{layout}=2 step on NCCL", "ok": ok, "tokens/s": float("nan"), "MFU": float("nan"),
            "peak GiB": float("nan"), "note": note}


def _pytest_row() -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p",
                          "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    last = (res.stdout.strip().splitlines() or ["no output"])[-1]
    return {"check": "pytest -m gpu", "ok": res.returncode == 0, "tokens/s": float("nan"), "MFU": float("nan"),
            "peak GiB": float("nan"), "note": f"{last[:50]} ({time.perf_counter() - t0:.0f} s)"}


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'check':44s} {'ok':4s} {'tokens/s':>10s} {'MFU':>7s} {'peak GiB':>9s}  note")
    for r in rows:
        mfu = f"{r['MFU']:.1%}" if r["MFU"] == r["MFU"] else "-"
        tps = f"{r['tokens/s']:.0f}" if r["tokens/s"] == r["tokens/s"] else "-"
        mem = f"{r['peak GiB']:.2f}" if r["peak GiB"] == r["peak GiB"] else "-"
        print(f"{r['check']:44s} {'yes' if r['ok'] else 'NO':4s} {tps:>10s} {mfu:>7s} {mem:>9s}  {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of the script itself)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible (CPU-only torch or no GPU); run it on a GPU node, or pass "
              "--device cpu --quick to check the script", file=sys.stderr)
        return 2
    device = rank_device(args.device)
    peak = measure_peak_flops(device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"MFU denominator {peak / 1e12:.1f} TFLOP/s")
    rows = [_pytest_row()] if device.type == "cuda" else []
    for name, case in (QUICK if args.quick else CASES).items():
        try:
            rows.append(_train_row(name, case, device, peak))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: a NO row, the run goes on
            rows.append({"check": f"train {name}", "ok": False, "tokens/s": float("nan"), "MFU": float("nan"),
                         "peak GiB": float("nan"), "note": (str(e).splitlines() or [type(e).__name__])[0][:60]})
    rows.append(_sampling_row(device))
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        tmp = ROOT / "runs" / "gpu-smoke"
        tmp.mkdir(parents=True, exist_ok=True)
        rows += [_nccl_row("tp", tmp), _nccl_row("dp", tmp)]
    _print_table(rows)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
