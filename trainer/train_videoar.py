"""Train the VideoAR transformer on pre-encoded latents with the curriculum, single process.

    python -m trainer.train_videoar --config configs/demo.yaml [key.sub=value ...]
    torchrun --nproc-per-node 4 -m trainer.train_videoar --config ... parallel.tp=2 [parallel.pp=2 | parallel.zero_stage=1]

Needs a trained tokenizer (videoar_train.tokenizer_ckpt, e.g. from `python -m trainer.train_tokenizer`). Each
curriculum stage's clips are encoded once into <run.dir>/videoar/latents/. Writes <run.dir>/videoar/:
config.yaml, metrics.jsonl + tensorboard/ + a Prometheus endpoint (URL in metrics_endpoint; run.metrics_port),
checkpoints/step-XXXXXXXX/ (+ `latest`). A rerun resumes from the newest committed checkpoint
(videoar_train.resume=false starts afresh) and continues exactly where it stopped. `python -m jobs.status
RUN_DIR` summarises a running or finished run.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline.clips import load_clip_folder
from data_pipeline.latent_set import cache_key, encode_latent_set, load_latent_set, save_latent_set
from data_pipeline.order import global_batch, rank_slice
from models.videoar import VideoAR
from parallel.engine import TorchEngine
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.topology import barrier, broadcast_object, data_parallel_group, destroy_topology, init_topology
from parallel.topology import describe_failure
from trainer.checkpoint import AsyncSaver
from trainer.config import Config, config_arg_parser, config_from_args, save_config
from trainer.curriculum import Curriculum, StageConfig
from trainer.evaluate import HeldOutEvaluator
from trainer.flops import measure_peak_flops, train_step_flops
from trainer.metrics import JsonlLogger, MetricSinks
from trainer.objective import breakdown, prepare_batch, sample_generator
from trainer.preemption import EXIT_PREEMPTED, PreemptionFlag
from trainer.step_metrics import PER_RANK, max_over_ranks, peak_memory_gb, throughput
from trainer.tokenizer_ckpt import WEIGHTS, load_tokenizer
from trainer.videoar_checkpoints import TrainerCheckpoints

log = logging.getLogger("train_videoar")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class VideoARRun:
    start_step: int  # 0, or the step resumed from
    step: int  # completed steps
    losses: list[float] = field(default_factory=list)  # per step run by this call
    checkpoint: Path | None = None
    metrics: Path | None = None
    preempted: bool = False  # stopped by SIGUSR1/SIGTERM after a checkpoint (rerun to resume)


def out_dir(cfg: Config) -> Path:
    return cfg.run_dir / "videoar"


def load_frozen_tokenizer(cfg: Config):
    tok, tok_cfg, _ = load_tokenizer(cfg.videoar_train.tokenizer_ckpt, cfg.run.device)
    for section in ("tokenizer", "quantizer"):
        if getattr(tok_cfg, section) != getattr(cfg, section):
            raise ValueError(f"{cfg.videoar_train.tokenizer_ckpt}: its {section} config differs from this run's "
                             f"{section} section; train VideoAR with the config the tokenizer was trained with")
    return tok.requires_grad_(False)


def stage_data(cfg: Config, tokenizer, stage: StageConfig, progress: bool, heldout: bool = False):
    """The stage's training samples: preprocessed shards (data.shards, local or S3) read through the streaming
    loader, or else the windows of data.clips_dir (all but the held-out clips) encoded once and cached. With
    `heldout`, the evaluation samples: data.eval_shards, or the windows of the last data.heldout_clips clips."""
    v, d = cfg.videoar, cfg.data
    if d.shards:
        from data_pipeline.loader import ShardSet
        bucket = f"{stage.resolution[0]}x{stage.resolution[1]}x{stage.frames}"
        return ShardSet(d.eval_shards if heldout else d.shards, bucket, d.endpoint_url or None, d.loader_workers)
    clips_dir = Path(d.clips_dir)
    listing = sorted((p.name, p.stat().st_size) for p in clips_dir.glob("*.mp4")) if clips_dir.is_dir() else []
    weights = Path(cfg.videoar_train.tokenizer_ckpt) / WEIGHTS
    key = cache_key(weights.stat().st_mtime_ns, weights.stat().st_size, listing, d.heldout_clips, stage.resolution,
                    stage.frames, v.cond, v.text_encoder, v.text_len, v.num_classes)
    name = f"{'heldout-' if heldout else ''}{stage.name}-{stage.resolution[0]}x{stage.resolution[1]}-f{stage.frames}"
    path = out_dir(cfg) / "latents" / f"{name}.safetensors"
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
    chosen = clips[-d.heldout_clips:] if heldout else clips[:-d.heldout_clips]
    ds = encode_latent_set(tokenizer, chosen, stage.frames, v.cond, encoder, v.num_classes,
                           progress=progress)
    save_latent_set(ds, path, key)
    return ds


class VideoARTrainer(TrainerCheckpoints):
    """Owns the model, the engine (optimizer, LR schedule, parallel layout), the curriculum and the data position;
    `state_dict` gathers them for checkpoints. The same loop runs one process or dp x pp x tp ranks."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.topo = init_topology(cfg.parallel, cfg.run.device)
        self.progress = progress and self.topo.rank == 0
        self.device = torch.device(cfg.run.device)
        torch.manual_seed(cfg.run.seed)  # every rank builds the same full model, then keeps its part
        self.tokenizer = load_frozen_tokenizer(cfg)
        model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim)
        model.checkpoint_blocks = cfg.parallel.activation_checkpointing
        self.model = apply_tensor_parallel(model, cfg.parallel.tp).to(self.device)
        self.curriculum = Curriculum(cfg.curriculum)
        for s in self.curriculum.stages:
            if s.global_batch % (s.micro_batch * self.topo.dp):
                raise ValueError(f"curriculum[{s.name}].global_batch={s.global_batch} must be a multiple of "
                                 f"micro_batch x data-parallel size = {s.micro_batch} x {self.topo.dp}")
        first = self.curriculum.stages[0]
        if cfg.parallel.zero_stage > 0:
            from parallel.engine import DeepSpeedEngine

            if cfg.videoar_train.async_save:
                log.warning("videoar_train.async_save applies to the ZeRO-0 engine; DeepSpeed (parallel.zero_stage="
                            "%d) writes its checkpoints synchronously", cfg.parallel.zero_stage)
            self.engine = DeepSpeedEngine(self.model, self.topo, cfg.parallel, cfg.videoar_train,
                                          self.curriculum.total_steps, self.device, first.global_batch,
                                          first.micro_batch)
        else:
            self.engine = TorchEngine(self.model, self.topo, cfg.parallel, cfg.videoar_train,
                                      self.curriculum.total_steps, self.device)
        self.step = 0
        self.consumed_tokens = 0  # video tokens of every sample consumed, over all stages
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient norm, over the run
        self.nonfinite_run = 0  # ... in a row, up to the last step
        self._stage_index, self._data, self._quantizer = -1, None, None
        self.ckpt_dir = out_dir(cfg) / "checkpoints"
        self.saver = AsyncSaver()
        self.peak_flops = cfg.run.peak_flops or broadcast_object(measure_peak_flops(cfg.run.device))
        self.ledger = None  # sample keys per step (videoar_train.sample_ledger)
        self._last_checkpoint: Path | None = None
        self.evaluator = HeldOutEvaluator(self, lambda stage: self._load_data(stage, heldout=True))
        self.eval_every = cfg.videoar_train.eval_every
        if self.eval_every and cfg.data.shards and not cfg.data.eval_shards:
            if self.topo.rank == 0:
                log.warning("videoar_train.eval_every=%d but data.shards is set without data.eval_shards: no "
                            "held-out evaluation (preprocess held-out videos and set data.eval_shards)",
                            self.eval_every)
            self.eval_every = 0

    # -- training ----------------------------------------------------------------------------------------------
    def _enter_stage(self, index: int) -> None:
        if index == self._stage_index:
            return
        stage = self.curriculum.stages[index]
        log.info("stage %s: %dx%d, %d frames, scales %s, global batch %d", stage.name, *stage.resolution,
                 stage.frames, stage.scales, stage.global_batch)
        self._data = self._load_data(stage)
        self._quantizer = self.tokenizer.quantizer.for_sizes(stage.sizes)
        self.engine.set_batch(stage.global_batch, stage.micro_batch)
        self._stage_index = index

    def _load_data(self, stage: StageConfig, heldout: bool = False):
        if self.topo.rank == 0:  # one rank encodes and caches; the others read the cache
            data = stage_data(self.cfg, self.tokenizer, stage, self.progress, heldout)
        barrier()
        if self.topo.rank != 0:
            data = stage_data(self.cfg, self.tokenizer, stage, False, heldout)
        return data

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and bit accuracy at the current stage (trainer/evaluate.py); a collective."""
        self._enter_stage(self.curriculum.index(max(self.step - 1, 0)))
        return self.evaluator.evaluate(self._stage_index, self._quantizer)

    def train_step(self) -> dict:
        """One optimizer step; the record has the loss breakdown and this rank's phase times."""
        t, cur, topo = self.cfg.videoar_train, self.curriculum, self.topo
        index = cur.index(self.step)
        self._enter_stage(index)
        stage, data, q = cur.stages[index], self._data, self._quantizer
        p_max = cur.flip_p_max(self.step)
        t0 = time.perf_counter()
        indices = global_batch(len(data), self.cfg.run.seed, cur.consumed[index], stage.global_batch)
        positions = rank_slice(list(range(stage.global_batch)), topo.dp_rank, topo.dp)  # this rank's samples
        lat, cond = data.batch([indices[j] for j in positions])
        if hasattr(data, "prefetch"):  # the next step's samples load while this one trains
            upcoming = global_batch(len(data), self.cfg.run.seed, cur.consumed[index] + stage.global_batch,
                                    stage.global_batch)
            data.prefetch([upcoming[j] for j in positions])
        t1 = time.perf_counter()
        layout = self.model.layout_for(lat.shape[1], q.sizes)
        gens = [sample_generator(self.cfg.run.seed, self.step, j) for j in positions]
        batch = prepare_batch(q, layout, lat.to(self.device), cond.to(self.device), stage, self.cfg.videoar.cond_drop,
                              p_max, t.flip_p_min, t.flip_delta, gens)
        t2 = time.perf_counter()
        lr = self.engine.lr
        loss, token_loss, token_correct = self.engine.forward_backward(batch.split(stage.micro_batch), layout)
        t3 = time.perf_counter()
        grad_norm, applied = self.engine.step()
        flip = batch.flip_ratio.sum()
        if topo.dp > 1:  # metrics over the global batch
            packed = torch.cat([loss.view(1) / topo.dp, flip.view(1), token_loss, token_correct])
            dist.all_reduce(packed, group=data_parallel_group())
            lv = token_loss.numel()
            loss, flip, token_loss, token_correct = packed[0], packed[1], packed[2:2 + lv], packed[2 + lv:]
        t4 = time.perf_counter()
        if self.ledger is not None:  # what this rank's loader actually delivered for this step
            self.ledger.log({"step": self.step + 1, "keys": [data.key(indices[j]) for j in positions]})
        cur.record(self.step, stage.global_batch)
        video_tokens = layout.length - layout.prefix_len
        self.consumed_tokens += stage.global_batch * video_tokens
        self.step += 1
        self.skipped_steps += not applied
        self.nonfinite_run = 0 if applied else self.nonfinite_run + 1
        frame_ids, scale_ids = (x[layout.prefix_len:] for x in layout.token_ids())
        return {"step": self.step, "total_steps": cur.total_steps, "stage": stage.name, "stage_index": index,
                "loss": float(loss),
                **breakdown(token_loss, token_correct, stage.global_batch, q.dim, frame_ids, scale_ids),
                "grad_norm": grad_norm, "lr": lr, "skipped_steps": self.skipped_steps, "flip_p_max": p_max,
                "flip_ratio": float(flip) / stage.global_batch, "frame_mask_p": stage.p_mask,
                "consumed_samples": sum(cur.consumed), "consumed_tokens": self.consumed_tokens,
                "tokens": stage.global_batch * video_tokens,
                "model_flops": train_step_flops(self.cfg.videoar, self.cfg.tokenizer.latent_dim, layout,
                                                stage.global_batch),
                "time/data_s": t1 - t0, "time/prepare_s": t2 - t1, "time/fwd_bwd_s": t3 - t2,
                "time/optimizer_s": t4 - t3, "time/checkpoint_s": 0.0}

    def finish_record(self, rec: dict) -> dict:
        """Phase times and memory as maxima over ranks (a collective: every rank calls it at the same step),
        then throughput and MFU."""
        rss, device_mem = peak_memory_gb(self.device)
        rec = {**rec, "mem/peak_rss_gb": rss, "mem/peak_device_gb": device_mem}
        rec.update(max_over_ranks({k: rec[k] for k in PER_RANK}))
        rec.update(throughput(rec, self.topo.world, self.peak_flops))
        return rec

    def _fail_nonfinite(self) -> None:
        k = self.nonfinite_run
        path = self.save()
        raise NonFiniteError(
            f"{k} consecutive steps ({self.step - k + 1}..{self.step}) had a non-finite loss or gradient norm and "
            f"were skipped (videoar_train.max_nonfinite_steps={self.cfg.videoar_train.max_nonfinite_steps}); "
            f"stopping. {path} holds the last good weights (unchanged since step {self.step - k}). Lower "
            "videoar_train.lr, check the data, or train in fp32 before resuming.")

    def train(self, max_steps: int | None = None, sinks: MetricSinks | None = None) -> VideoARRun:
        """Train until the curriculum ends (or `max_steps` total completed steps), checkpointing on the way.
        Rank 0 logs to `sinks` (left open, e.g. to scrape them afterwards) or to its own, closed at the end."""
        t, cur, topo = self.cfg.videoar_train, self.curriculum, self.topo
        main_rank = topo.rank == 0
        out = out_dir(self.cfg)
        if main_rank:
            out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, out / "config.yaml")
        resumed = self.maybe_resume()
        run = VideoARRun(self.step, self.step, metrics=out / "metrics.jsonl")
        end = cur.total_steps if max_steps is None else min(max_steps, cur.total_steps)
        own_sinks = sinks is None and main_rank
        if own_sinks:
            sinks = MetricSinks(out, "videoar", append=resumed, tensorboard=self.cfg.run.tensorboard,
                                prometheus_port=self.cfg.run.metrics_port)
        if t.sample_ledger:
            self.ledger = JsonlLogger(out / "samples" / f"rank-{topo.rank:05d}.jsonl", append=resumed)
        bar = tqdm(total=end, initial=self.step, desc="videoar", unit="step", disable=not self.progress,
                   mininterval=0.5 if sys.stderr.isatty() else 20.0)
        preemption = PreemptionFlag().install()
        try:
            while self.step < end:
                rec = self.train_step()
                run.losses.append(rec["loss"])
                bar.update(1)
                bar.set_postfix(stage=rec["stage"], loss=f"{rec['loss']:.4f}", acc=f"{rec['bit_acc']:.3f}",
                                refresh=False)  # the bar's own interval decides (logs stay small without a tty)
                if self.nonfinite_run >= t.max_nonfinite_steps:
                    if sinks:
                        sinks.log(rec)
                    self._fail_nonfinite()
                switch = cur.index(self.step) != cur.index(self.step - 1)
                run.preempted = preemption.agreed()  # every rank stops after the same step
                t_ckpt = time.perf_counter()
                if run.preempted or self.step % t.ckpt_every == 0 or self.step == end or switch:
                    # the last checkpoint of a run (or before a preemption exit) is synchronous: it is committed
                    # when the process ends
                    last = run.preempted or self.step == end
                    run.checkpoint = self.save(blocking=not t.async_save or last)
                rec["time/checkpoint_s"] = time.perf_counter() - t_ckpt
                evaluated = bool(self.eval_every) and not run.preempted and (self.step % self.eval_every == 0
                                                                            or self.step == end)
                if evaluated:
                    t_eval = time.perf_counter()
                    rec.update(self.evaluate())
                    rec["time/eval_s"] = time.perf_counter() - t_eval
                if self.step % t.log_every == 0 or self.step == end or run.preempted or evaluated:
                    rec = self.finish_record(rec)
                    if sinks:
                        sinks.log(rec)
                if run.preempted:
                    log.warning("preempted (%s) after step %d: checkpoint %s",
                                preemption.signal_name or "another rank", self.step, run.checkpoint)
                    break
            run.checkpoint = self.wait_for_save() or run.checkpoint
        except RuntimeError as e:
            described = describe_failure(e, topo, self.cfg.parallel.timeout_s) if topo.distributed else e
            if described is e:
                raise
            log.error("%s", described)
            raise described from e
        finally:
            preemption.uninstall()
            bar.close()
            if own_sinks:
                sinks.close()
            elif sinks:
                sinks.flush()
            if self.ledger:
                self.ledger.close()
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
    trainer = VideoARTrainer(cfg)
    try:
        run = trainer.train(args.max_steps)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rank = trainer.topo.rank
    destroy_topology()
    if run.preempted:
        return EXIT_PREEMPTED
    if rank != 0:
        return 0
    print(f"steps {run.start_step} -> {run.step}; last loss {run.losses[-1] if run.losses else float('nan'):.4f}\n"
          f"checkpoint: {run.checkpoint}\nmetrics: {run.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
