"""Train the VideoAR transformer on pre-encoded latents with the curriculum.

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

import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from common.config import Config, config_arg_parser, config_from_args, config_to_dict, save_config
from common.metrics import JsonlLogger, MetricSinks
from data_pipeline.loader import StreamingLoader
from models.objective import BitObjective, breakdown, prepare_batch, sample_generator, scale_loss_weights
from models.videoar import VideoAR
from parallel.collectives import all_reduce_packed, broadcast_object, data_parallel_group, max_over_ranks
from parallel.parallelize import parallelize
from parallel.topology import describe_failure, destroy_topology, init_topology, rank_device
from trainer.checkpointing import CheckpointManager, CheckpointWriteError, RNGState, TrainState, check_shared_run_dir
from trainer.curriculum import Curriculum, resolve_micro_batches
from trainer.evaluate import HeldOutEvaluator
from trainer.flops import measure_peak_flops, train_step_flops
from trainer.preemption import EXIT_PREEMPTED, PreemptionFlag
from trainer.quality import stage_end_quality
from trainer.step_metrics import PER_RANK, clock, peak_memory_gb, throughput
from trainer.videoar_data import load_frozen_tokenizer, out_dir, stage_data, wait_for_stage_data

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


class VideoARTrainer:
    """Builds the model, the engine (optimizer, LR schedule, parallel layout), the curriculum, the loader and the
    checkpoint manager, then runs the loop. The same loop runs one process or dp x pp x tp ranks."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, t = cfg, cfg.videoar_train
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.topo = init_topology(cfg.parallel, cfg.run.device)
        self.progress = progress and self.topo.rank == 0
        self.device = rank_device(cfg.run.device)
        check_shared_run_dir(cfg.run_dir, self.topo.rank, self.topo.world)
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = load_frozen_tokenizer(cfg, self.device)
        # pipeline ranks build the model on the meta device and materialize only their stage (parallelize); the
        # initial values come from per-parameter seeds, so every layout starts from the single-process weights
        with torch.device("meta") if self.topo.pp > 1 else contextlib.nullcontext():
            self.model = VideoAR(cfg.videoar, cfg.tokenizer.latent_dim, init_seed=cfg.run.seed)
        self.model.checkpoint_blocks = cfg.parallel.activation_checkpointing
        self.plan = self.model.parallel_plan()
        stages = resolve_micro_batches(cfg.curriculum, self.topo.dp, lambda part: self.model.layout_for(
            self.tokenizer.latent_frames(part.frames), part.sizes).length)
        self.cfg = cfg = dataclasses.replace(cfg, curriculum=stages)  # micro-batches set by token budgets
        self.curriculum = Curriculum(cfg.curriculum)
        for s in self.curriculum.stages:
            for part in s.parts():  # every part (clips, images) of a step splits evenly over the ranks
                if part.global_batch % (s.micro_batch * self.topo.dp):
                    what = "image_batch" if part.name != s.name else "global_batch - image_batch"
                    raise ValueError(f"curriculum[{s.name}].{what}={part.global_batch} must be a multiple of "
                                     f"micro_batch x data-parallel size = {s.micro_batch} x {self.topo.dp}")
                length = self.model.layout_for(self.tokenizer.latent_frames(part.frames), part.sizes).length
                if length % self.topo.cp:  # context parallel: every sequence splits evenly over the cp ranks
                    raise ValueError(f"curriculum[{part.name}]: {length}-token sequences do not split over "
                                     f"parallel.cp={self.topo.cp} (prefix + latent frames x tokens per frame)")
        first = self.curriculum.stages[0]
        self.engine = parallelize(self.model, self.plan, self.topo, cfg.parallel, t, self.curriculum.total_steps,
                                  self.device, first.global_batch, first.micro_batch)
        self.state = TrainState()
        self.loader = StreamingLoader(self.curriculum.stream_names, cfg.run.seed, self.topo.dp_rank, self.topo.dp)
        self.checkpoints = CheckpointManager(
            out_dir(cfg) / "checkpoints", self.engine, self.state, {"rng": RNGState(), "curriculum": self.loader},
            self.topo.rank, self.topo.world, self._checkpoint_metadata, t.ckpt_every, t.keep_last, t.async_save,
            cfg.parallel.timeout_s)
        self._stage_index, self.quantizer = -1, None
        self.parts: list[tuple[int, object, object]] = []  # the stage's (stream index, part, quantizer) per part
        self.peak_flops = cfg.run.peak_flops or broadcast_object(measure_peak_flops(self.device))
        self.ledger = None  # sample keys per step (videoar_train.sample_ledger)
        self.evaluator = HeldOutEvaluator(self, lambda stage: self._load_data(stage, heldout=True))
        self.eval_every = t.eval_every
        if self.eval_every and cfg.data.shards and not cfg.data.eval_shards:
            if self.topo.rank == 0:
                log.warning("videoar_train.eval_every=%d but data.shards is set without data.eval_shards: no "
                            "held-out evaluation (preprocess held-out videos and set data.eval_shards)",
                            self.eval_every)
            self.eval_every = 0

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    # -- data and stages ---------------------------------------------------------------------------------------
    def _enter_stage(self, index: int) -> None:
        if index == self._stage_index:
            return
        stage = self.curriculum.stages[index]
        self.parts = []
        for j, part in self.curriculum.stage_streams(index):
            log.info("stage %s: %d x %dx%d, %d frames, scales %s", part.name, part.global_batch, *part.resolution,
                     part.frames, part.scales)
            self.loader.set_stream(j, self._load_data(part))
            self.parts.append((j, part, self.tokenizer.quantizer.for_sizes(part.sizes)))
        self.loader.drop_streams({j for j, _, _ in self.parts})
        self.quantizer = self.parts[0][2]  # the first part's: held-out evaluation and sampling use it
        self.engine.set_batch(stage.global_batch, stage.micro_batch)
        self._stage_index = index

    def _load_data(self, stage, heldout: bool = False):
        if self.topo.rank == 0:  # one rank encodes and caches; the others wait for the cache on the filesystem
            return stage_data(self.cfg, self.tokenizer, stage, self.progress, heldout)
        return wait_for_stage_data(self.cfg, stage, heldout, self.cfg.parallel.data_wait_s)

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and bit accuracy at the current stage (trainer/evaluate.py); a collective."""
        self._enter_stage(self.curriculum.index(max(self.step - 1, 0)))
        return self.evaluator.evaluate(self._stage_index, self.quantizer)

    # -- one step ----------------------------------------------------------------------------------------------
    def _prepare(self, batches: list, p_max: float) -> list[tuple]:
        """(micro-batch, objective, layout) of each stage part's loaded batch: CFEC, frame mask, condition dropout."""
        t, out = self.cfg.videoar_train, []
        for (_, part, q), batch in zip(self.parts, batches):
            motion = t.motion_loss_weight if part.motion_loss_weight is None else part.motion_loss_weight
            layout = self.model.layout_for(batch.latents.shape[1], q.sizes)
            gens = [sample_generator(self.cfg.run.seed, self.state.step, j) for j in batch.positions]
            micro = prepare_batch(q, layout, batch.latents.to(self.device), batch.cond.to(self.device), part,
                                  self.cfg.videoar.cond_drop, p_max, t.flip_p_min, t.flip_delta, gens, t.flip_inherit)
            out.append((micro, BitObjective(layout.length - layout.prefix_len,
                                            scale_loss_weights(layout, t.scale_loss_weight, motion, t.motion_loss_scales,
                                                               t.first_frame_loss_weight)),
                        layout))
        return out

    def train_step(self) -> dict:
        """One optimizer step over every part of the stage (clips, images); the record has the loss breakdown and
        this rank's phase times."""
        cur, topo, st = self.curriculum, self.topo, self.state
        index = cur.index(st.step)
        self._enter_stage(index)
        stage, p_max = cur.stages[index], cur.flip_p_max(st.step)
        t0 = clock(self.device)
        batches, offset = [], 0
        for j, part, _ in self.parts:  # the parts take consecutive positions of the step's global batch
            batches.append(self.loader.next_batch(j, part.global_batch, offset))
            offset += part.global_batch
        t1 = clock(self.device)
        prepared = self._prepare(batches, p_max)
        t2 = clock(self.device)
        lr = self.engine.lr
        loss, stats = self.engine.forward_backward([(m.split(stage.micro_batch), o) for m, o, _ in prepared])
        t3 = clock(self.device)
        grad_norm, applied = self.engine.step()
        flip = sum(m.flip_ratio.sum() for m, _, _ in prepared)
        if topo.dp > 1:  # metrics over the global batch
            loss, flip, *stats = all_reduce_packed([loss / topo.dp, flip, *stats], data_parallel_group())
        t4 = clock(self.device)
        if self.ledger is not None:  # what this rank's loader actually delivered for this step
            self.ledger.log({"step": st.step + 1, "keys": [k for b in batches for k in b.keys]})
        tokens = sum(part.global_batch * (lay.length - lay.prefix_len)
                     for (_, part, _), (_, _, lay) in zip(self.parts, prepared))
        st.consumed_tokens += tokens
        st.step += 1
        st.skipped_steps += not applied
        st.nonfinite_run = 0 if applied else st.nonfinite_run + 1
        return {"step": st.step, "total_steps": cur.total_steps, "stage": stage.name, "stage_index": index,
                "loss": float(loss), **self._breakdown(prepared, stats),
                "grad_norm": grad_norm, "lr": lr, "skipped_steps": st.skipped_steps, "flip_p_max": p_max,
                "flip_ratio": float(flip) / stage.global_batch, "frame_mask_p": stage.p_mask,
                "consumed_samples": sum(self.loader.consumed), "consumed_tokens": st.consumed_tokens,
                "tokens": tokens,
                **self._step_flops(prepared),
                "time/data_s": t1 - t0, "time/prepare_s": t2 - t1, "time/fwd_bwd_s": t3 - t2,
                "time/optimizer_s": t4 - t3, "time/checkpoint_s": 0.0}

    def _step_flops(self, prepared: list[tuple]) -> dict[str, int]:
        """The step's model FLOPs: `model_flops` with attention over the pairs the mask lets through (the MFU
        numerator), `model_flops_dense` with L x L attention (what the dense-mask kernel computes)."""
        v, d = self.cfg.videoar, self.cfg.tokenizer.latent_dim
        return {key: sum(train_step_flops(v, d, lay, part.global_batch, attention, part.window)
                         for (_, part, _), (_, _, lay) in zip(self.parts, prepared))
                for key, attention in (("model_flops", "useful"), ("model_flops_dense", "dense"))}

    def _breakdown(self, prepared: list[tuple], stats: list) -> dict[str, float]:
        """Per-scale/per-frame losses and bit accuracy of the first part; a joint stage's images get
        `images/loss` and `images/bit_acc`."""
        out = {}
        for k, ((_, part, q), (_, objective, layout), part_stats) in enumerate(zip(self.parts, prepared, stats)):
            frame_ids, scale_ids = (x[layout.prefix_len:] for x in layout.token_ids())
            token_loss, token_correct = objective.split_stats(part_stats)
            parts = breakdown(token_loss, token_correct, part.global_batch, q.dim, frame_ids, scale_ids)
            if k == 0:
                out.update(parts)
            else:
                out.update({"images/bit_acc": parts["bit_acc"],
                            "images/loss": float(token_loss.sum() / (part.global_batch * token_loss.numel()))})
        return out

    def finish_record(self, rec: dict) -> dict:
        """Phase times and memory as maxima over ranks (a collective: every rank calls it at the same step),
        then throughput and MFU."""
        rss, device_mem = peak_memory_gb(self.device)
        rec = {**rec, "mem/peak_rss_gb": rss, "mem/peak_device_gb": device_mem}
        rec.update(max_over_ranks({k: rec[k] for k in PER_RANK}))
        rec.update(throughput(rec, self.topo.world, self.peak_flops))
        return rec

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _checkpoint_metadata(self) -> dict:
        return {"config": config_to_dict(self.cfg), "stage": self.curriculum.stage(max(0, self.step - 1)).name,
                "world_size": self.topo.world, "layout": self.engine.parallel_layout, "tp_split": self.plan.tp_split}

    def save(self, final: bool = True) -> Path | None:
        return self.checkpoints.save(self.step, final)

    def _check_resumable(self, meta: dict) -> None:
        if meta["config"]["videoar"] != dataclasses.asdict(self.cfg.videoar):
            raise ValueError(f"{self.checkpoints.root}: checkpoint step {meta['step']} was trained with a different "
                             f"videoar model config; use a new run.dir or videoar_train.resume=false")

    def maybe_resume(self) -> bool:
        if not self.cfg.videoar_train.resume or self.checkpoints.load_latest(self._check_resumable) is None:
            return False
        self.curriculum.check_consumed(self.loader.consumed, self.step)
        log.info("resumed from step %d", self.step)
        return True

    def _fail_nonfinite(self) -> None:
        k = self.state.nonfinite_run
        path = self.save()
        raise NonFiniteError(
            f"{k} consecutive steps ({self.step - k + 1}..{self.step}) had a non-finite loss or gradient norm and "
            f"were skipped (videoar_train.max_nonfinite_steps={self.cfg.videoar_train.max_nonfinite_steps}); "
            f"stopping. {path} holds the last good weights (unchanged since step {self.step - k}). Lower "
            "videoar_train.lr, check the data, or train in fp32 before resuming.")

    # -- the loop ----------------------------------------------------------------------------------------------
    def _after_step(self, rec: dict, run: VideoARRun, end: int, sinks: MetricSinks | None) -> None:
        """Checkpoint, evaluate and log as their policies say, after every rank agreed on a preemption."""
        cur, step = self.curriculum, self.step
        t_ckpt = time.perf_counter()
        if self.checkpoints.should_save(step, end, cur.index(step) != cur.index(step - 1), run.preempted):
            run.checkpoint = self.save(final=run.preempted or step == end)
        rec["time/checkpoint_s"] = time.perf_counter() - t_ckpt
        evaluated = bool(self.eval_every) and not run.preempted and (step % self.eval_every == 0 or step == end)
        if evaluated:
            t_eval = time.perf_counter()
            rec.update(self.evaluate())
            rec["time/eval_s"] = time.perf_counter() - t_eval
        stage_end = step == end or cur.index(step) != cur.index(step - 1)
        if self.cfg.videoar_train.quality_eval and stage_end and not run.preempted:
            t_quality = time.perf_counter()
            rec.update(stage_end_quality(self, step, sinks))
            rec["time/quality_s"] = time.perf_counter() - t_quality
            evaluated = True
        if step % self.cfg.videoar_train.log_every == 0 or step == end or run.preempted or evaluated:
            rec = self.finish_record(rec)
            if sinks:
                sinks.log(rec)

    def train(self, max_steps: int | None = None, sinks: MetricSinks | None = None,
              preemption: PreemptionFlag | None = None) -> VideoARRun:
        """Train until the curriculum ends (or `max_steps` total completed steps), checkpointing on the way.
        Rank 0 logs to `sinks` (left open, e.g. to scrape them afterwards) or to its own, closed at the end."""
        t, topo, out = self.cfg.videoar_train, self.topo, out_dir(self.cfg)
        if topo.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, out / "config.yaml")
        resumed = self.maybe_resume()
        run = VideoARRun(self.step, self.step, metrics=out / "metrics.jsonl")
        end = self.curriculum.total_steps if max_steps is None else min(max_steps, self.curriculum.total_steps)
        own_sinks = sinks is None and topo.rank == 0
        if own_sinks:
            sinks = MetricSinks(out, "videoar", append=resumed, tensorboard=self.cfg.run.tensorboard,
                                prometheus_port=self.cfg.run.metrics_port)
        if t.sample_ledger:
            self.ledger = JsonlLogger(out / "samples" / f"rank-{topo.rank:05d}.jsonl", append=resumed)
        bar = tqdm(total=end, initial=self.step, desc="videoar", unit="step", disable=not self.progress,
                   mininterval=0.5 if sys.stderr.isatty() else 20.0)
        own_flag = preemption is None  # else the caller installed it (and uninstalls it)
        preemption = PreemptionFlag().install() if own_flag else preemption
        try:
            while self.step < end:
                rec = self.train_step()
                run.losses.append(rec["loss"])
                bar.update(1)
                bar.set_postfix(stage=rec["stage"], loss=f"{rec['loss']:.4f}", acc=f"{rec['bit_acc']:.3f}",
                                refresh=False)  # the bar's own interval decides (logs stay small without a tty)
                if self.state.nonfinite_run >= t.max_nonfinite_steps:
                    if sinks:
                        sinks.log(rec)
                    self._fail_nonfinite()
                run.preempted = preemption.agreed()  # every rank stops after the same step
                self._after_step(rec, run, end, sinks)
                if run.preempted:
                    log.warning("preempted (%s) after step %d: checkpoint %s",
                                preemption.signal_name or "another rank", self.step, run.checkpoint)
                    break
            run.checkpoint = self.checkpoints.wait() or run.checkpoint
        except RuntimeError as e:
            described = describe_failure(e, topo, self.cfg.parallel.timeout_s) if topo.distributed else e
            if described is e:
                raise
            log.error("%s", described)
            raise described from e
        finally:
            if own_flag:
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
    # first thing: a USR1 during start-up (tokenizer loading, latent encoding) is kept, not fatal
    preemption = PreemptionFlag().install()
    parser = config_arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many total steps (a checkpoint "
                                                                    "is written; rerun to continue)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trainer = VideoARTrainer(cfg)
    try:
        run = trainer.train(args.max_steps, preemption=preemption)
    except (NonFiniteError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        preemption.uninstall()
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
