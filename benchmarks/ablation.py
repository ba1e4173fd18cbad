"""Ablations as a tool: train each arm with the same data, seed and step budget, evaluate each the same way, print
one table (issue 15; the paper's Table 4 mirrored by --paper-arms).

    python -m benchmarks.ablation --config configs/ablation.yaml --out runs/ablation \
        --arm "flat_rope: videoar.rope=flat" --arm "temporal_rope: videoar.rope=temporal" [--paper-arms] \
        [--captions 16 --drift-clips 4 --horizon 2] [key.sub=value ...]

An arm is `name: key=value key=value ...` (config overrides on top of the config and the shared overrides);
`stages.KEY=value` sets KEY in every curriculum stage (e.g. stages.flip_end=0.25, stages.p_mask=0.2). Each arm
trains in <out>/<name> (a finished arm is reused: its run resumes at its last step and trains no more); all arms
share the tokenizer of videoar_train.tokenizer_ckpt (trained once into <out>/tokenizer when it does not exist) and
the encoded latents. Evaluated per arm: held-out teacher-forced bit loss (plain teacher forcing), text-to-video
caption accuracies for the distinct held-out captions, and image-to-video drift at the last trained frame and at
`horizon` x the trained length. Writes <out>/ablation.json and <out>/ablation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import yaml

from common.atomic import atomic_write_text
from common.config import Config, config_from_dict, config_to_dict, load_config
from common.metrics import read_jsonl
from data_pipeline.clips import read_caption, split_heldout
from data_pipeline.synth import generate_clips
from data_pipeline.tokenizer_ckpt import load_tokenizer
from trainer.caption_sensitivity import clip_latents
from trainer.quality import evaluate_quality, unique_captions
from trainer.sample import load_videoar
from trainer.train_tokenizer import train_tokenizer
from trainer.train_videoar import train_videoar
from trainer.videoar_data import out_dir

# The paper's Table 4 (UCF-101 gFVD after 1,000 steps), one arm per row, cumulative.
PAPER_ARMS = [
    "baseline: videoar.rope=flat stages.flip_start=0 stages.flip_end=0",
    "mst_rope: videoar.rope=temporal stages.flip_start=0 stages.flip_end=0",
    "time_corruption: videoar.rope=temporal videoar_train.flip_inherit=false",
    "error_inheritance: videoar.rope=temporal videoar_train.flip_inherit=true",
]
PAPER_GFVD = {"baseline": 96.04, "mst_rope": 94.95, "time_corruption": 93.57, "error_inheritance": 92.50}
COLUMNS = [("eval/loss", "held-out loss"), ("quality/color", "colour"), ("quality/shape", "shape"),
           ("quality/direction", "direction"), ("quality/present_90", "present>=90%"),
           ("quality/drift_trained", "drift@T"), ("quality/drift_end", "drift@end"),
           ("quality/direction_gap", "dir. gap"), ("quality/color_gap", "col. gap")]


def parse_arm(text: str) -> tuple[str, list[str], list[str]]:
    """'name: a.b=1 stages.c=2' -> (name, config overrides, per-stage overrides)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--arm {text!r}: expected 'name: key=value ...' with a name of letters, digits, _ and -")
    items = shlex.split(rest)
    if any("=" not in i for i in items):
        raise ValueError(f"--arm {text!r}: every override must look like key.sub=value")
    return name, [i for i in items if not i.startswith("stages.")], [i[7:] for i in items if i.startswith("stages.")]


def arm_config(config: str, shared: list[str], overrides: list[str], stage_overrides: list[str], run_dir: Path
               ) -> Config:
    """The config of one arm: file <- shared <- arm overrides, stage keys set in every stage, run.dir = run_dir."""
    cfg = load_config(config, shared + overrides + [f"run.dir={run_dir}"])
    if not stage_overrides:
        return cfg
    d = config_to_dict(cfg)
    for item in stage_overrides:
        key, value = item.split("=", 1)
        for stage in d["curriculum"]:
            if key not in stage:
                raise ValueError(f"stages.{key}: curriculum stages have no key {key!r} (keys: {sorted(stage)})")
            stage[key] = yaml.safe_load(value)
    return config_from_dict(d)


def ensure_data(cfg: Config, out: Path) -> tuple[str, list[Path]]:
    """(tokenizer checkpoint, held-out clips): the synthetic clips and the tokenizer, made once for all arms."""
    d = cfg.data
    generate_clips(d.clips_dir, d.synth_clips, frames=d.synth_frames, size=tuple(d.resolution), fps=d.fps,
                   seed=cfg.run.seed, world=d.synth_world)
    tok = Path(cfg.videoar_train.tokenizer_ckpt)
    try:
        load_tokenizer(tok)
    except (FileNotFoundError, ValueError):
        print(f"training the shared tokenizer -> {out / 'tokenizer'}", flush=True)
        tok = train_tokenizer(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(out)))).checkpoint
    clips = sorted(Path(d.clips_dir).glob("*.mp4"))
    return str(tok), split_heldout(clips, d.heldout_clips, d.clips_dir)[1]


def run_arm(cfg: Config, held: list[Path], first_arm: Path | None, captions: int, drift_clips: int,
            horizon: int) -> dict:
    """Train (or reuse) one arm and evaluate its last checkpoint; `first_arm`: the videoar directory of an arm
    trained before, whose encoded latents this one reuses."""
    latents = out_dir(cfg) / "latents"
    if first_arm is not None and not latents.exists() and (first_arm / "latents").is_dir():
        shutil.copytree(first_arm / "latents", latents)  # same tokenizer and clips: the cache key still checks it
    t0 = time.time()
    run = train_videoar(cfg, progress=True)
    train_s = time.time() - t0
    evals = [r for r in read_jsonl(run.metrics) if "eval/loss" in r]
    model, saved, step = load_videoar(out_dir(cfg) / "checkpoints")
    tokenizer, _, _ = load_tokenizer(cfg.videoar_train.tokenizer_ckpt)
    prompts = unique_captions([read_caption(p) for p in held], captions)
    report = evaluate_quality(model, saved, step, tokenizer, out_dir(cfg) / "quality" / f"step-{step:08d}", prompts,
                              held[:drift_clips], seed=cfg.run.seed, horizon=horizon,
                              gap_data=clip_latents(tokenizer, held, saved.curriculum[-1]))
    return {"step": step, "train_s": round(train_s, 1), **(({"eval/loss": evals[-1]["eval/loss"]}) if evals else {}),
            **report.metrics(), "drift": report.drift}


def table(rows: dict[str, dict], overrides: dict[str, str]) -> str:
    """A Markdown table, one row per arm."""
    paper = any(name in PAPER_GFVD for name in rows)
    head = ["arm", "overrides", *(label for _, label in COLUMNS)] + (["paper gFVD"] if paper else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, f"`{overrides[name]}`" if overrides[name] else "-"]
        cells += [(f"{r[k]:.4f}" if k.endswith("_gap") else f"{r[k]:.3f}") if k in r else "-" for k, _ in COLUMNS]
        cells += [str(PAPER_GFVD.get(name, "-"))] if paper else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/ablation.yaml", help="the shared recipe (YAML)")
    parser.add_argument("--out", default="runs/ablation", help="one run directory per arm under this")
    parser.add_argument("--arm", action="append", default=[], help="'name: key=value ...' (repeat)")
    parser.add_argument("--paper-arms", action="store_true", help="add the arms of the paper's Table 4")
    parser.add_argument("--captions", type=int, default=16, help="distinct held-out captions sampled per arm")
    parser.add_argument("--drift-clips", type=int, default=4, help="held-out clips continued from their first frame")
    parser.add_argument("--horizon", type=int, default=2, help="drift measured up to this x the trained length")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides shared by every arm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        arms = [parse_arm(a) for a in (PAPER_ARMS if args.paper_arms else []) + args.arm]
        if not arms or len({a[0] for a in arms}) != len(arms):
            raise ValueError("give at least one --arm (or --paper-arms), with distinct names")
        out = Path(args.out)
        base = load_config(args.config, args.overrides)
        tok, held = ensure_data(base, out)
        shared = list(args.overrides) + [f"videoar_train.tokenizer_ckpt={tok}"]
        configs = {name: arm_config(args.config, shared, o, s, out / name) for name, o, s in arms}
    except ValueError as e:  # ConfigError is a ValueError
        parser.error(str(e))
    rows, first = {}, None
    for name, cfg in configs.items():
        print(f"arm {name}: training {cfg.curriculum[-1].until_step} steps in {out / name}", flush=True)
        rows[name] = run_arm(cfg, held, first, args.captions, args.drift_clips, args.horizon)
        first = first or out_dir(cfg)
    overrides = {name: " ".join(o + [f"stages.{x}" for x in s]) for name, o, s in arms}
    md = table(rows, overrides)
    atomic_write_text(out / "ablation.json", json.dumps({"arms": rows, "overrides": overrides}, indent=1))
    atomic_write_text(out / "ablation.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
