"""Train the VideoAR transformer on pre-encoded latents with the curriculum, single process.

    python -m trainer.train_videoar --config configs/demo.yaml [key.sub=value ...]

Needs a trained tokenizer (videoar_train.tokenizer_ckpt, e.g. from `python -m trainer.train_tokenizer`). Each
curriculum stage's clips are encoded once into <run.dir>/videoar/latents/. Writes <run.dir>/videoar/:
config.yaml, metrics.jsonl, checkpoints/step-XXXXXXXX/ (+ `latest`). A rerun resumes from the newest committed
checkpoint (videoar_train.resume=false starts afresh) and continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipeline.clips import load_clip_folder
from data_pipeline.latent_set import LatentSet, cache_key, encode_latent_set, load_latent_set, save_latent_set
from data_pipeline.order import global_batch
from models.videoar import VideoAR
from trainer.checkpoint import load_latest, save_checkpoint
from trainer.config import Config, config_arg_parser, config_from_args, config_to_dict, save_config
from trainer.curriculum import Curriculum, StageConfig
from trainer.metrics import JsonlLogger
from trainer.objective import breakdown, micro_batch_loss
from trainer.schedules import param_groups, warmup_cosine
from trainer.tokenizer_ckpt import WEIGHTS, load_tokenizer

log = logging.getLogger("train_videoar")
SHARD = "rank-00000.pt"


@dataclass
class VideoARRun:
    start_step: int  # 0, or the step resumed from
    step: int  # completed steps
    losses: list[float] = field(default_factory=list)  # per step run by this call
    checkpoint: Path | None = None
    metrics: Path | None = None


def out_dir(cfg: Config) -> Path:
    return cfg.run_dir / "videoar"


def load_frozen_tokenizer(cfg: Config):
    tok, tok_cfg, _ = load_tokenizer(cfg.videoar_train.tokenizer_ckpt, cfg.run.device)
    for section in ("tokenizer", "quantizer"):
        if getattr(tok_cfg, section) != getattr(cfg, section):
            raise ValueError(f"{cfg.videoar_train.tokenizer_ckpt}: its {section} config differs from this run's "
                             f"{section} section; train VideoAR with the config the tokenizer was trained with")
    return tok.requires_grad_(False)


def stage_data(cfg: Config, tokenizer, stage: StageConfig, progress: bool) -> LatentSet:
    """The stage's training windows (all clips but the held-out ones), encoded once and cached."""
    v, d = cfg.videoar, cfg.data
    clips_dir = Path(d.clips_dir)
    listing = sorted((p.name, p.stat().st_size) for p in clips_dir.glob("*.mp4")) if clips_dir.is_dir() else []
    weights = Path(cfg.videoar_train.tokenizer_ckpt) / WEIGHTS
    key = cache_key(weights.stat().st_mtime_ns, weights.stat().st_size, listing, d.heldout_clips, stage.resolution,
                    stage.frames, v.cond, v.text_encoder, v.text_len, v.num_classes)
    path = out_dir(cfg) / "latents" / f"{stage.name}-{stage.resolution[0]}x{stage.resolution[1]}-f{stage.frames}.safetensors"
    cached = load_latent_set(path, key)
    if cached is not None:
        return cached
    clips = load_clip_folder(clips_dir, tuple(stage.resolution), stage.frames, progress=progress)
    if len(clips) <= d.heldout_clips:
        raise ValueError(f"{clips_dir}: {len(clips)} clips, need more than data.heldout_clips={d.heldout_clips}")
    encoder = None
    if v.cond == "text":
        from models.text_encoder import TextEncoder
        encoder = TextEncoder(v.text_encoder, v.text_len, cfg.run.device)
        if encoder.dim != v.text_dim:
            raise ValueError(f"videoar.text_dim={v.text_dim} but {v.text_encoder} has width {encoder.dim}")
    ds = encode_latent_set(tokenizer, clips[:-d.heldout_clips], stage.frames, v.cond, encoder, v.num_classes,
                           progress=progress)
    save_latent_set(ds, path, key)
    return ds


class VideoARTrainer:
    """Owns the model, optimizer, LR schedule, curriculum and RNG; `state_dict` gathers them for checkpoints."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        t = cfg.videoar_train
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = load_frozen_tokenizer(cfg)
        self.model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim).to(cfg.run.device)
        self.opt = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
        self.curriculum = Curriculum(cfg.curriculum)
        total = self.curriculum.total_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: warmup_cosine(s, t.warmup_steps, total, t.min_lr_ratio))
        self.generator = torch.Generator().manual_seed(cfg.run.seed + 2)
        self.step = 0
        self._stage_index, self._data, self._quantizer = -1, None, None
        self.ckpt_dir = out_dir(cfg) / "checkpoints"

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "curriculum": self.curriculum.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
                "step": self.step}

    def load_state_dict(self, state: dict, source: str) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{source}: does not fit this model/optimizer ({str(e).splitlines()[0]})") from None
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.curriculum.load_state_dict(state["curriculum"], self.step)
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])

    def save(self) -> Path:
        stage = self.curriculum.stage(max(0, self.step - 1))
        meta = {"config": config_to_dict(self.cfg), "stage": stage.name, "world_size": 1}
        return save_checkpoint(self.ckpt_dir, self.step, {SHARD: self.state_dict()}, meta,
                               self.cfg.videoar_train.keep_last)

    def maybe_resume(self) -> bool:
        if not self.cfg.videoar_train.resume:
            return False
        found = load_latest(self.ckpt_dir)
        if found is None:
            return False
        meta, shards = found
        saved = meta["config"]["videoar"]
        if saved != dataclasses.asdict(self.cfg.videoar):
            raise ValueError(f"{self.ckpt_dir}: checkpoint step {meta['step']} was trained with a different "
                             f"videoar model config; use a new run.dir or videoar_train.resume=false")
        self.load_state_dict(shards[SHARD], f"{self.ckpt_dir} step {meta['step']}")
        log.info("resumed from step %d", self.step)
        return True

    # -- training ----------------------------------------------------------------------------------------------
    def _enter_stage(self, index: int) -> None:
        if index == self._stage_index:
            return
        stage = self.curriculum.stages[index]
        log.info("stage %s: %dx%d, %d frames, scales %s, global batch %d", stage.name, *stage.resolution,
                 stage.frames, stage.scales, stage.global_batch)
        self._data = stage_data(self.cfg, self.tokenizer, stage, self.progress)
        self._quantizer = self.tokenizer.quantizer.for_sizes(stage.sizes)
        self._stage_index = index

    def train_step(self) -> dict:
        t, cur = self.cfg.videoar_train, self.curriculum
        index = cur.index(self.step)
        self._enter_stage(index)
        stage, data, q = cur.stages[index], self._data, self._quantizer
        p_max = cur.flip_p_max(self.step)
        t0 = time.perf_counter()
        indices = global_batch(len(data), self.cfg.run.seed, cur.consumed[index], stage.global_batch)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        token_loss = token_correct = None
        loss_sum, flip = 0.0, 0.0
        for m in range(stage.accumulation):
            lat, cond = data.batch(indices[m * stage.micro_batch:(m + 1) * stage.micro_batch])
            r = micro_batch_loss(self.model, q, lat.to(self.cfg.run.device), cond.to(self.cfg.run.device), stage,
                                 p_max, t.flip_p_min, t.flip_delta, self.generator, t.precision == "bf16")
            (r.loss / stage.accumulation).backward()
            loss_sum += r.loss.item() / stage.accumulation
            flip += r.flip_ratio / stage.accumulation
            token_loss = r.token_loss if token_loss is None else token_loss + r.token_loss
            token_correct = r.token_correct if token_correct is None else token_correct + r.token_correct
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip else float("inf"))
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        cur.record(self.step, stage.global_batch)
        self.step += 1
        elapsed = time.perf_counter() - t0
        layout = self.model.layout_for(data.latents.shape[1], q.sizes)
        frame_ids, scale_ids = (x[layout.prefix_len:] for x in layout.token_ids())
        return {"step": self.step, "stage": stage.name, "loss": loss_sum,
                **breakdown(token_loss, token_correct, stage.global_batch, q.dim, frame_ids, scale_ids),
                "grad_norm": float(grad_norm), "lr": lr, "flip_p_max": p_max, "flip_ratio": flip,
                "tokens_per_s": stage.global_batch * (layout.length - layout.prefix_len) / elapsed,
                "step_time_s": elapsed}

    def train(self, max_steps: int | None = None) -> VideoARRun:
        """Train until the curriculum ends (or `max_steps` total completed steps), checkpointing on the way."""
        t, cur = self.cfg.videoar_train, self.curriculum
        out_dir(self.cfg).mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, out_dir(self.cfg) / "config.yaml")
        resumed = self.maybe_resume()
        run = VideoARRun(self.step, self.step, metrics=out_dir(self.cfg) / "metrics.jsonl")
        end = cur.total_steps if max_steps is None else min(max_steps, cur.total_steps)
        metrics = JsonlLogger(run.metrics, append=resumed)
        bar = tqdm(total=end, initial=self.step, desc="videoar", unit="step", disable=not self.progress,
                   mininterval=0.5 if sys.stderr.isatty() else 20.0)
        while self.step < end:
            rec = self.train_step()
            run.losses.append(rec["loss"])
            bar.update(1)
            bar.set_postfix(stage=rec["stage"], loss=f"{rec['loss']:.4f}", acc=f"{rec['bit_acc']:.3f}")
            if self.step % t.log_every == 0 or self.step == end:
                metrics.log(rec)
            switch = cur.index(self.step) != cur.index(self.step - 1)
            if self.step % t.ckpt_every == 0 or self.step == end or switch:
                run.checkpoint = self.save()
        bar.close()
        metrics.close()
        run.step = self.step
        return run


def train_videoar(cfg: Config, progress: bool = True, max_steps: int | None = None) -> VideoARRun:
    return VideoARTrainer(cfg, progress).train(max_steps)


def main(argv: list[str] | None = None) -> int:
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many total steps (a checkpoint "
                                                                    "is written; rerun to continue)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = train_videoar(cfg, max_steps=args.max_steps)
    print(f"steps {run.start_step} -> {run.step}; last loss {run.losses[-1] if run.losses else float('nan'):.4f}\n"
          f"checkpoint: {run.checkpoint}\nmetrics: {run.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
