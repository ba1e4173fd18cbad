"""The main job on embedded defaults, end to end on one CPU machine.

    python -m jobs.demo --config configs/demo.yaml [key.sub=value ...]      (what `make demo` runs)

Steps: (1) deterministic synthetic H.264 clips with captions into data.clips_dir (skipped when they exist);
(2) the 3D multi-scale bitwise tokenizer, with held-out reconstructions; (3) Ray preprocessing of the clips into
pre-tokenized WebDataset shards in a local object-store directory (preprocess.output); (4) VideoAR pretraining
over the curriculum's two stages on 2 local processes (data parallel) reading those shards, with a simulated
preemption (SIGUSR1 to the launcher) and an automatic resume from the checkpoint it writes, its samples scored at
every stage end; (5) samples for the distinct held-out captions, scored against them by the synthetic world's
detectors (trainer/quality.py), and image-to-video continuations to twice the trained length with their drift
from the real clips, as .mp4 (+ JSON sidecars) and PNG; (6) a summary: tokenizer PSNR/SSIM by scales, caption
accuracies, drift, throughput.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_pipeline.clips import read_caption, split_heldout
from data_pipeline.preprocess import preprocess
from data_pipeline.synth import generate_clips
from common.metrics import read_jsonl
from common.config import Config, config_arg_parser, config_from_args, load_config, save_config
from trainer.preemption import EXIT_PREEMPTED
from trainer.caption_sensitivity import clip_latents
from trainer.quality import QualityReport, describe, evaluate_quality, unique_captions
from trainer.sample import load_videoar
from data_pipeline.tokenizer_ckpt import load_tokenizer
from trainer.train_tokenizer import TokenizerRun, describe_quality, train_tokenizer
from trainer.videoar_data import out_dir

NPROC = 2
DRIFT_CLIPS = 4  # held-out clips continued from their first frame (image-to-video drift)


def _metric_steps(path: Path) -> list[dict]:
    """Records of a metrics log that may be growing (a torn last line is skipped); a redone step's last record."""
    return list({r["step"]: r for r in read_jsonl(path)}.values()) if path.exists() else []


def finished_tokenizer(cfg: Config) -> TokenizerRun | None:
    """The tokenizer of an earlier demo run with the same config, if it finished (a rerun resumes after it)."""
    out = cfg.run_dir / "tokenizer"
    try:
        _, saved, step = load_tokenizer(out / "checkpoint")
    except (FileNotFoundError, ValueError):
        return None
    evals = [r for r in _metric_steps(out / "metrics.jsonl") if "heldout/psnr" in r]
    same = all(getattr(saved, k) == getattr(cfg, k) for k in ("data", "tokenizer", "quantizer", "tokenizer_train"))
    if step != cfg.tokenizer_train.steps or not same or len(evals) < 2:
        return None
    print("      reusing the finished tokenizer of an earlier run", flush=True)
    quality = {k.split("/", 1)[1]: v for k, v in evals[-1].items() if k.startswith("heldout/")}
    return TokenizerRun(evals[0]["heldout/psnr"], evals[-1]["heldout/psnr"], quality, out / "checkpoint",
                        out / "recon" / "reconstructions.png", [])


def train_with_preemption(cfg: Config, preempt_at: int) -> tuple[int, float]:
    """Train on NPROC local processes; once step `preempt_at` is logged, send SIGUSR1 like a scheduler would,
    then relaunch: the run resumes from the checkpoint written at the signal (`preempt_at` 0: no preemption).
    Returns (stopped step, seconds)."""
    run_cfg = cfg.run_dir / "videoar-launch.yaml"
    save_config(cfg, run_cfg)
    cmd = [sys.executable, "-m", "jobs.launch", "--nproc", str(NPROC), "--threads", str(max(1, os.cpu_count() // NPROC)),
           "--master-port", str(29400 + os.getpid() % 500), "--", "--config", str(run_cfg)]
    metrics = out_dir(cfg) / "metrics.jsonl"
    t0 = time.time()
    stopped = 0
    proc = subprocess.Popen(cmd)
    signalled = preempt_at <= 0  # 0 = no simulated preemption (`--preempt-at 0`)
    while proc.poll() is None:
        # records of this launch only: a rerun finds the earlier run's records in the same file
        if not signalled and any(r["step"] >= preempt_at and r.get("time", 0) >= t0 for r in _metric_steps(metrics)):
            print(f"      simulated preemption: SIGUSR1 to the launcher after step {preempt_at}", flush=True)
            proc.send_signal(signal.SIGUSR1)
            signalled = True
        time.sleep(0.5)
    if proc.returncode == EXIT_PREEMPTED:
        stopped = int((out_dir(cfg) / "checkpoints" / "latest").read_text().strip()[5:])
        print(f"      checkpointed at step {stopped} and exited {EXIT_PREEMPTED}: relaunching (auto-resume)", flush=True)
        proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"VideoAR training failed (exit {proc.returncode}); see the log above")
    return stopped, time.time() - t0


def _copy_clips(paths: list[Path], dst: Path) -> Path:
    """`paths` (with their caption sidecars) copied into `dst`, so a preprocessing job sees just these."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in paths:
        for src in (p, p.with_suffix(".json")):
            if src.exists() and not (dst / src.name).exists():
                (dst / src.name).write_bytes(src.read_bytes())
    return dst


def _sample(cfg: Config, ckpts: Path, samples_dir: Path, held: list[Path]) -> QualityReport:
    """Text-to-video samples of the distinct held-out captions (scored against them) and image-to-video from the
    first held-out clips, continued to twice the trained length (drift against the real clips)."""
    model, saved, step = load_videoar(ckpts)
    tokenizer, _, _ = load_tokenizer(saved.videoar_train.tokenizer_ckpt)
    prompts = unique_captions([read_caption(p) for p in held], saved.videoar_train.quality_samples) \
        if saved.videoar.cond == "text" else []
    gap_data = clip_latents(tokenizer, held, saved.curriculum[-1]) if prompts else None
    return evaluate_quality(model, saved, step, tokenizer, samples_dir, prompts, held[:DRIFT_CLIPS],
                            seed=cfg.run.seed, gap_data=gap_data)


def _preprocess_split(args, cfg: Config, train: list[Path], held: list[Path]):
    """Ray preprocessing of the training clips into preprocess.output and of the held-out clips into
    `<output>-heldout`; returns (the training job's summary, shards, held-out shards)."""
    train_dir = _copy_clips(train, cfg.run_dir / "train-clips")  # preprocessing sees these only
    held_dir = _copy_clips(held, cfg.run_dir / "heldout-clips")
    shards = cfg.preprocess.output
    eval_shards = shards.rstrip("/") + "-heldout"
    print(f"[3/5] Ray preprocessing {train_dir} -> shards in {shards} (held-out clips -> {eval_shards})", flush=True)
    pre = preprocess(load_config(args.config, list(args.overrides) + [f"preprocess.input={train_dir}"]))
    print(f"      {pre.clips} clips -> {pre.shards} shards ({pre.bytes / 2**20:.1f} MB) in {pre.seconds:.0f} s; "
          f"{pre.skipped} videos already done, {pre.quarantined} quarantined", flush=True)
    held_pre = preprocess(load_config(args.config, list(args.overrides) + [
        f"preprocess.input={held_dir}", f"preprocess.output={eval_shards}", f"run.dir={cfg.run_dir / 'heldout'}"]))
    print(f"      held-out: {held_pre.clips} clips -> {held_pre.shards} shards", flush=True)
    return pre, shards, eval_shards


def _summaries(records: list[dict]) -> tuple[str, str]:
    """(the last held-out evaluations, throughput per stage) as summary lines."""
    evals = [r for r in records if "eval/loss" in r]
    heldout = "; ".join(f"step {r['step']}: bit loss {r['eval/loss']:.3f}, bit accuracy {r['eval/bit_acc']:.3f}"
                        for r in evals[-2:]) or "-"
    by_stage: dict[str, list[dict]] = {}
    for r in records:
        by_stage.setdefault(r["stage"], []).append(r)
    mean = lambda rs, k: sum(r.get(k, 0.0) for r in rs) / len(rs)  # noqa: E731
    throughput = "; ".join(f"{name}: {mean(rs, 'tokens_per_s_per_device'):.0f} tokens/s/process, "
                           f"{mean(rs, 'step_time_s'):.2f} s/step, MFU {100 * mean(rs, 'mfu'):.1f}%, data wait "
                           f"{100 * mean(rs, 'data_wait_frac'):.1f}%" for name, rs in by_stage.items())
    return heldout, throughput


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--preempt-at", type=int, default=100, help="simulate a preemption after this step (0: no)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    d = cfg.data
    print(f"[1/5] synthetic clips -> {d.clips_dir}", flush=True)
    generate_clips(d.clips_dir, d.synth_clips, frames=d.synth_frames, size=tuple(d.resolution), fps=d.fps,
                   seed=cfg.run.seed, world=d.synth_world)
    print(f"[2/5] tokenizer training ({cfg.tokenizer_train.steps} steps) -> {cfg.run_dir / 'tokenizer'}", flush=True)
    tok = finished_tokenizer(cfg) or train_tokenizer(cfg)

    clips = sorted(Path(d.clips_dir).glob("*.mp4"))
    train, held = split_heldout(clips, d.heldout_clips, d.clips_dir)  # the clips training holds out
    pre, shards, eval_shards = _preprocess_split(args, cfg, train, held)

    train_cfg = load_config(args.config, list(args.overrides) + [f"data.shards={shards}",
                                                                 f"data.eval_shards={eval_shards}"])
    stages = ", ".join(f"{s.name} (to step {s.until_step}, {s.resolution[0]}x{s.resolution[1]}, {s.frames} frames)"
                       for s in train_cfg.curriculum)
    print(f"[4/5] VideoAR pretraining on {NPROC} processes: {stages} -> {out_dir(train_cfg)}", flush=True)
    stopped, train_s = train_with_preemption(train_cfg, args.preempt_at)
    records = _metric_steps(out_dir(train_cfg) / "metrics.jsonl")
    last = records[-1] if records else {}
    samples_dir = cfg.run_dir / "samples"
    print(f"[5/5] sampling the held-out captions + {DRIFT_CLIPS} image-to-video continuations -> {samples_dir}",
          flush=True)
    ckpts = out_dir(train_cfg) / "checkpoints"
    quality = _sample(train_cfg, ckpts, samples_dir, held)
    heldout, throughput = _summaries(records)
    print(f"\nDone in {time.time() - t0:.0f} s.\n"
          f"  tokenizer held-out:      PSNR {tok.psnr_start:.2f} dB at step 0 -> {describe_quality(tok.quality)} "
          f"({tok.recon_png})\n"
          f"  shards:                  {shards}/manifest.json ({pre.clips or 'all'} clips, "
          f"{pre.seconds and pre.clips / pre.seconds:.1f} clips/s)\n"
          f"  VideoAR:                 step {last.get('step')}, bit loss {math.log(2):.3f} (chance) -> "
          f"{last.get('loss', float('nan')):.3f}, bit accuracy {last.get('bit_acc', float('nan')):.3f}; "
          f"preempted at step {stopped or '-'} and resumed; {train_s:.0f} s on {NPROC} processes\n"
          f"  held-out (plain teacher forcing): {heldout}\n"
          f"  throughput:              {throughput}\n"
          f"  checkpoints:             {ckpts}/ (latest: {(ckpts / 'latest').read_text().strip()})\n"
          f"  samples vs captions:     {describe(quality)}\n"
          f"  samples:                 {quality.contact_sheet} (caption | sample rows), .mp4 + .json sidecars in "
          f"{samples_dir}/text-to-video and image-to-video/ (python -m trainer.evaluate_videos --samples DIR)\n"
          f"  dashboards (metrics):    {cfg.run_dir / 'tokenizer' / 'metrics.jsonl'}, "
          f"{out_dir(train_cfg) / 'metrics.jsonl'}; tensorboard --logdir {cfg.run_dir}\n"
          f"  run summary:             python -m jobs.status {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
