"""Held-out evaluation of VideoAR: every `videoar_train.eval_every` steps (and at the end of a run), the bit loss
and bit accuracy of plain teacher forcing (no bit flips, no frame mask, no condition dropout) on held-out samples
at the current curriculum stage's shape, logged as `eval/*` next to the training metrics.

Held-out samples are the windows of the last `data.heldout_clips` clips of data.clips_dir (never trained on), or
the preprocessed shards at `data.eval_shards` when training reads shards. The numbers are a pure function of the
weights and those samples, so every parallel layout reports the same ones: each data-parallel rank evaluates its
strided part of the first n samples (n split evenly over ranks and micro-batches), and the per-token sums are added
over ranks. `eval/loss` is the plain mean bit loss, whatever `videoar_train.scale_loss_weight` is.
"""

from __future__ import annotations

import dataclasses
import logging

from data_pipeline.order import rank_slice
from models.objective import BitObjective, breakdown, prepare_batch, sample_generator
from parallel.collectives import all_reduce, data_parallel_group

log = logging.getLogger("train_videoar")
EVAL_STEP = -1  # the generator stream of held-out samples (nothing random is drawn with every probability 0)


def eval_count(available: int, dp: int, micro_batch: int, limit: int = 0) -> tuple[int, int]:
    """(samples, micro-batch size) of one evaluation: all held-out samples (or `limit`), split evenly over the
    data-parallel ranks in micro-batches of the stage's size (smaller if a rank has fewer samples), rounded down to
    whole micro-batches; (0, 0) when there are fewer samples than ranks."""
    per_rank = (min(available, limit) if limit else available) // dp
    micro = min(micro_batch, per_rank)
    return (dp * (per_rank - per_rank % micro), micro) if micro else (0, 0)


class HeldOutEvaluator:
    """The held-out set of each curriculum stage (loaded once) and the evaluation itself; every rank calls
    `evaluate` at the same steps (it is a collective)."""

    def __init__(self, trainer, load_stage_data):
        self.trainer, self.load = trainer, load_stage_data
        self._stage, self._data, self._warned = -1, None, set()

    def data_for(self, index: int):
        if index != self._stage:
            self._data, self._stage = self.load(self.trainer.curriculum.stage_streams(index)[0][1]), index
        return self._data

    def evaluate(self, index: int, quantizer) -> dict[str, float]:
        tr = self.trainer
        cfg, topo, stage = tr.cfg, tr.topo, tr.curriculum.stage_streams(index)[0][1]  # a joint stage's clips
        data = self.data_for(index)
        n, micro = eval_count(len(data), topo.dp, stage.micro_batch, cfg.videoar_train.eval_samples)
        if n == 0:
            if index not in self._warned and topo.rank == 0:
                log.warning("stage %s: %d held-out samples for %d data-parallel ranks; held-out evaluation "
                            "skipped (raise data.heldout_clips)", stage.name, len(data), topo.dp)
            self._warned.add(index)
            return {}
        positions = rank_slice(list(range(n)), topo.dp_rank, topo.dp)
        lat, cond = data.batch(positions)
        layout = tr.model.layout_for(lat.shape[1], quantizer.sizes)
        plain = dataclasses.replace(stage, p_mask=0.0)  # the attention window stays: it is part of the model
        gens = [sample_generator(cfg.run.seed, EVAL_STEP, j) for j in positions]
        batch = prepare_batch(quantizer, layout, lat.to(tr.device), cond.to(tr.device), plain, 0.0, 0.0, 0.0, 0.0,
                              gens)
        objective = BitObjective(layout.length - layout.prefix_len)  # the plain mean, whatever the weighting
        stats = tr.engine.evaluate(batch.split(micro), objective)
        if topo.dp > 1:
            all_reduce(stats, data_parallel_group())
        token_loss, token_correct = objective.split_stats(stats)
        frame_ids, scale_ids = (x[layout.prefix_len:] for x in layout.token_ids())
        parts = breakdown(token_loss, token_correct, n, quantizer.dim, frame_ids, scale_ids)
        return {"eval/loss": float(token_loss.sum() / (n * token_loss.numel())), "eval/samples": n,
                **{f"eval/{k}": v for k, v in parts.items()}}
