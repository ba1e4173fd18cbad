"""Checkpoint side of the VideoAR trainer (DESIGN §6): what a rank saves, synchronous and asynchronous saves with
one commit per step, and resume under any ZeRO-0 layout (or DeepSpeed's own format on the same layout)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from parallel.consolidate import SINGLE, model_shards
from parallel.engine import TorchEngine
from parallel.reshard import assemble
from parallel.topology import barrier, broadcast_object
from trainer.checkpoint import (begin_checkpoint, commit_checkpoint, load_latest, snapshot, step_dir,
                                wait_for_shards, write_shard)
from trainer.config import config_to_dict

log = logging.getLogger("train_videoar")


class TrainerCheckpoints:
    """Mixed into `VideoARTrainer`: uses its cfg, topo, engine, curriculum, step counters, ckpt_dir and saver."""

    @property
    def layout(self) -> dict[str, int]:
        return {"tp": self.topo.tp, "pp": self.topo.pp, "dp": self.topo.dp, "zero_stage": self.cfg.parallel.zero_stage}

    @property
    def shard_name(self) -> str:
        return f"rank-{self.topo.rank:05d}.pt"

    def state_dict(self) -> dict:
        state = {"curriculum": self.curriculum.state_dict(), "rng": {"torch": torch.get_rng_state()},
                 "step": self.step, "consumed_tokens": self.consumed_tokens, "skipped_steps": self.skipped_steps}
        if not isinstance(self.engine, TorchEngine):
            return state
        return {**self.engine.state_dict(), **state}

    def load_state_dict(self, state: dict, source: str) -> None:
        """Trainer state (step, curriculum, RNG) of a checkpoint shard; the engine is loaded separately."""
        self.step = int(state["step"])
        self.consumed_tokens = int(state.get("consumed_tokens", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.curriculum.load_state_dict(state["curriculum"], self.step)
        torch.set_rng_state(state["rng"]["torch"])

    def save(self, blocking: bool = True) -> Path | None:
        """Checkpoint the current step; returns the committed directory. `blocking=False` (ZeRO-0 engine) copies
        the state and returns None at once: a background thread writes it and rank 0 commits it when every
        rank's shard is durable; `wait_for_save` joins it."""
        previous = self.saver.wait()  # one save in flight at a time
        stage = self.curriculum.stage(max(0, self.step - 1))
        topo = self.topo
        meta = {"config": config_to_dict(self.cfg), "stage": stage.name, "world_size": topo.world,
                "layout": self.layout}
        keep, step = self.cfg.videoar_train.keep_last, self.step
        tmp = begin_checkpoint(self.ckpt_dir, step) if topo.rank == 0 else None
        tmp = broadcast_object(tmp)
        if not blocking and isinstance(self.engine, TorchEngine):
            state, names = snapshot(self.state_dict()), [f"rank-{r:05d}.pt" for r in range(topo.world)]
            timeout = self.cfg.parallel.timeout_s

            def write_and_commit() -> Path | None:
                write_shard(tmp, self.shard_name, state)
                if topo.rank != 0:
                    return None
                wait_for_shards(tmp, names, timeout)
                return commit_checkpoint(self.ckpt_dir, step, tmp, meta, keep)

            self.saver.submit(write_and_commit)
            self._last_checkpoint = previous or self._last_checkpoint
            return None
        write_shard(tmp, self.shard_name, self.state_dict())
        if not isinstance(self.engine, TorchEngine):
            self.engine.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        barrier()  # every shard is on disk before the commit marker
        final = commit_checkpoint(self.ckpt_dir, step, tmp, meta, keep) if topo.rank == 0 else None
        self._last_checkpoint = broadcast_object(final)
        return self._last_checkpoint

    def wait_for_save(self) -> Path | None:
        """Join an asynchronous save; every rank returns the newest committed checkpoint directory."""
        done = self.saver.wait()
        barrier()
        self._last_checkpoint = broadcast_object(done) or self._last_checkpoint
        return self._last_checkpoint

    def maybe_resume(self) -> bool:
        if not self.cfg.videoar_train.resume:
            return False
        # one read of the newest verified step: the shards that hold the model once (any ZeRO-0 layout) + ours
        found = load_latest(self.ckpt_dir, wanted=lambda meta: model_shards(meta) | {self.shard_name})
        if found is None:
            return False
        meta, shards = found
        saved = meta["config"]["videoar"]
        if saved != dataclasses.asdict(self.cfg.videoar):
            raise ValueError(f"{self.ckpt_dir}: checkpoint step {meta['step']} was trained with a different "
                             f"videoar model config; use a new run.dir or videoar_train.resume=false")
        layout = self.layout
        saved_layout = meta.get("layout", SINGLE)
        source = f"{self.ckpt_dir} step {meta['step']}"
        if isinstance(self.engine, TorchEngine) and saved_layout["zero_stage"] == 0:
            # any dp x pp x tp layout: rebuild this rank's slices from the full state (parallel.reshard)
            by_rank = {int(name[5:10]): shards[name] for name in model_shards(meta)}
            model, optim = assemble(by_rank, saved_layout)
            first = by_rank[0]
            try:
                self.engine.load_full_state(model, optim, first["optim_hparams"], first["scheduler"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ValueError(f"{source}: does not fit this model/optimizer ({str(e).splitlines()[0]})") from None
            self.load_state_dict(first, source)
        else:
            if saved_layout != layout:
                raise ValueError(f"{source}: saved with layout {saved_layout}, this run is {layout}. DeepSpeed ZeRO "
                                 "partitions the optimizer state over the data-parallel ranks and cannot be resharded "
                                 "here; resume with the same parallel.tp/pp/zero_stage and world size (or consolidate "
                                 "the weights with `python -m parallel.consolidate` and start a new run)")
            self.engine.engine.load_checkpoint(str(step_dir(self.ckpt_dir, meta["step"]) / "deepspeed"), tag="state")
            self.load_state_dict(shards[self.shard_name], source)
        log.info("resumed from step %d", self.step)
        return True

