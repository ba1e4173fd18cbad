"""The checkpoint manager (DESIGN §6, torchtitan's `CheckpointManager`): it is handed the engine and the stateful
components (objects with `state_dict`/`load_state_dict`: the loader, the RNG, the train state) and owns the save
policy: every `ckpt_every` steps, at stage switches, before a preemption exit and at the end; keep-last-k;
asynchronous saves when the engine supports them. The format (names, shards, metadata, commit, verified reads,
resharding) is parallel/checkpoint_format.py.

Async save (`AsyncSaver`): the state is copied to CPU memory (the only stall), and a background thread writes
the shard; in a multi-rank job rank 0's thread waits until every rank's shard exists under its final name (each
is renamed into place only after fsync) and then commits. One save is in flight at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from common.atomic import atomic_write_text
from parallel import checkpoint_format as fmt
from parallel.collectives import any_rank, barrier, broadcast_object, new_group
from parallel.dcp_format import load_tensors, saved_shapes, snapshot_slices
from parallel.engine import Engine

log = logging.getLogger("train_videoar")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps
    consumed_tokens: int = 0  # video tokens of every sample consumed, over all stages
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, over the run
    nonfinite_run: int = 0  # ... in a row, up to the last step (not saved: a resumed run starts a new streak)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.consumed_tokens = int(state.get("consumed_tokens", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))


class RNGState:
    """The host RNG (torch's default generator); per-sample draws have their own seeded streams."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written on some rank; nothing of it was committed."""


class CheckpointManager:
    """Saves and restores `engine` + `states` under `root` (`<run>/videoar/checkpoints`): a rank's shard holds the
    engine's state and the train state's fields at its top level and each other component under its key.
    `metadata()` gives what goes into metadata.json besides the format's own fields (config, stage, layout)."""

    def __init__(self, root: Path, engine: Engine, train: Stateful, states: dict[str, Stateful], rank: int,
                 world: int, metadata: Callable[[], dict], every: int, keep_last: int, async_save: bool,
                 timeout_s: float):
        self.root, self.engine, self.train, self.states = Path(root), engine, train, states
        self.rank, self.world = rank, world
        self.metadata, self.every, self.keep_last, self.timeout_s = metadata, every, keep_last, timeout_s
        if async_save and not engine.supports_async_save:
            log.warning("videoar_train.async_save applies to the ZeRO-0 engine; DeepSpeed (parallel.zero_stage=%d) "
                        "writes its checkpoints synchronously", engine.parallel_layout["zero_stage"])
        self.async_save = async_save and engine.supports_async_save
        self.saver = AsyncSaver()
        self.last: Path | None = None  # the newest committed checkpoint
        # DCP plans over a gloo group of its own: a background save never interleaves with training collectives
        self.group = new_group(list(range(world)), backend="gloo") if world > 1 else None
        self.bytes_read = 0  # by this rank at the last resume (benchmarks.resume_io)

    def should_save(self, step: int, end: int, stage_switch: bool, preempted: bool) -> bool:
        return preempted or step % self.every == 0 or step == end or stage_switch

    def shard(self) -> dict[str, Any]:
        return {**self.engine.state_dict(), **self.train.state_dict(),
                **{k: obj.state_dict() for k, obj in self.states.items()}}

    def save(self, step: int, final: bool = True) -> Path | None:
        """Checkpoint `step`; returns the committed directory. With async saves and not `final` (the last
        checkpoint of a run, or before a preemption exit, is synchronous: committed when the process ends) the
        state is copied and None returned at once; `wait` joins the background write."""
        previous = self.saver.wait()  # one save in flight at a time
        meta, name = self.metadata(), fmt.shard_name(self.rank)
        tmp = broadcast_object(fmt.begin_checkpoint(self.root, step) if self.rank == 0 else None)
        tensors = self.engine.checkpoint_tensors()  # in the training thread: a collective under DeepSpeed
        if self.async_save and not final:
            state, names = fmt.snapshot(self.shard()), [fmt.shard_name(r) for r in range(self.world)]
            tensors = snapshot_slices(tensors)

            def write_and_commit() -> Path | None:
                fmt.write_rank_checkpoint(tmp, name, state, tensors, self.group)
                if self.rank != 0:
                    return None
                fmt.wait_for_shards(tmp, names, self.timeout_s)
                return fmt.commit_checkpoint(self.root, step, tmp, meta, self.keep_last)

            self.saver.submit(write_and_commit)
            self.last = previous or self.last
            return None
        self._agree_written(step, tmp, lambda: fmt.write_rank_checkpoint(tmp, name, self.shard(), tensors,
                                                                         self.group))
        barrier()  # every shard is on disk before the commit marker
        committed = fmt.commit_checkpoint(self.root, step, tmp, meta, self.keep_last) if self.rank == 0 else None
        self.last = broadcast_object(committed)
        return self.last

    def _agree_written(self, step: int, tmp: Path, write: Callable[[], Any]) -> None:
        """Run `write`; if it failed on any rank (a full disk, an I/O error), every rank raises the same
        `CheckpointWriteError` (no rank waits for a shard that never comes) and the partial step is removed, so it
        neither shows as committed nor keeps the space it took."""
        error = None
        try:
            write()
        except OSError as e:
            error = e
        if any_rank(error is not None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            what = f"rank {self.rank}: {error}" if error is not None else "another rank failed to write its shard"
            raise CheckpointWriteError(f"checkpoint of step {step} not written ({what}); the last committed "
                                       f"checkpoint {self.last or 'in ' + str(self.root)} is intact: free space "
                                       "and rerun to resume from it")

    def wait(self) -> Path | None:
        """Join an asynchronous save; every rank returns the newest committed checkpoint directory."""
        done = self.saver.wait()
        barrier()
        self.last = broadcast_object(done) or self.last
        return self.last

    def load_latest(self, validate: Callable[[dict], None] = lambda meta: None) -> dict | None:
        """Restore the newest verified step into the engine and the components (reading the shards the saved
        layout needs plus this rank's own); returns its metadata, or None when there is none. `validate(meta)`
        may refuse it before anything is loaded."""
        own, first = fmt.shard_name(self.rank), fmt.shard_name(0)
        wanted = lambda meta: self.engine.shards_to_read(meta) | {own, first}  # noqa: E731

        def load_engine(meta: dict, shards: dict) -> None:  # a collective; a corrupted chunk falls back
            validate(meta)
            directory = fmt.step_dir(self.root, meta["step"])
            self.bytes_read = sum((directory / f).stat().st_size
                                  for f in fmt.files_read(meta, wanted(meta), (self.rank, self.world)))
            if meta["format_version"] >= 3:
                targets = self.engine.checkpoint_targets(saved_shapes(directory))
                self.bytes_read += load_tensors(directory, targets, self.group, meta.get("items"))
                self.engine.load_checkpoint(targets, shards.get(first) or shards[own])
            else:
                self.engine.load(directory, meta, shards)

        found = fmt.load_latest(self.root, wanted=wanted, then=load_engine)
        if found is None:
            return None
        meta, shards = found
        source = shards.get(first) or shards[own]  # rank 0's when the layout changed
        self.train.load_state_dict(source)
        for key, obj in self.states.items():
            obj.load_state_dict(source[key])
        return meta


WRITER_NICE = 10  # the background checkpoint writer yields the cores to the training threads


def lower_thread_priority(increment: int = WRITER_NICE) -> None:
    """Lower this thread's CPU priority by `increment` niceness (per thread on Linux; threads it starts inherit
    it); a no-op where that is not possible. Not SCHED_IDLE: with training keeping every core busy (CPU runs) an
    idle-class writer never runs, and the checkpoint would wait for the next save to be committed."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError):
        pass


class AsyncSaver:
    """Runs one checkpoint write at a time in a background thread; `wait()` joins it and re-raises its error."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None

    def submit(self, fn: Callable[[], Any]) -> None:
        self.wait()

        def run() -> None:
            try:
                lower_thread_priority()
                self._result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> Any:
        """The finished save's result (e.g. the committed path; None on ranks that do not commit)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"asynchronous checkpoint save failed: {error}") from error
        result, self._result = self._result, None
        return result


def check_shared_run_dir(run_dir: Path, rank: int, world: int, settle_s: float = 30.0) -> None:
    """Every rank must see the same run directory (checkpoints are committed by rank 0 from the shards all ranks
    write; ranks > 0 read the latent cache rank 0 writes): rank 0 writes a token, every rank must read it back."""
    if world == 1:
        return
    probe = Path(run_dir) / ".shared-fs-check"
    token = None
    if rank == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        token = f"{time.time_ns()}-{os.getpid()}"
        atomic_write_text(probe, token)
    token = broadcast_object(token)
    deadline = time.monotonic() + settle_s  # an NFS client may cache the directory for a few seconds
    while (seen := probe.read_text() if probe.is_file() else None) != token and time.monotonic() < deadline:
        time.sleep(0.5)
    if any_rank(seen != token):
        raise RuntimeError(f"{run_dir}: not the same directory on every rank (rank {rank} read {seen!r}, rank 0 "
                           f"wrote {token!r}); run.dir must be on a filesystem all nodes share (NFS, Lustre, ...)")
