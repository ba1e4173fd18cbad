"""Checkpoint write speed against the disk, and the training-loop stall of an asynchronous save against a
synchronous one, measured side by side in one run.

    python -m benchmarks.checkpoint_io [--depth 6 --width 512 --dir runs/bench-ckpt --threads N]

1. `dd if=/dev/zero bs=1M conv=fsync` writes as many bytes as one checkpoint shard into --dir: the disk's
   sequential write rate. 2. A synchronous save the trainer's way (`parallel.checkpoint_format.
   write_rank_checkpoint`: the tensors through torch.distributed.checkpoint, each byte hashed as it is written
   (per chunk and per file, parallel/dcp_writer.py) and flushed to disk behind the writer, fsynced; the small rank
   shard; commit) of a VideoAR model + AdamW state into the same directory: checkpoint MB/s, and the ratio to dd.
3. The stall: how long the training loop is blocked by `save` (sync: the whole save; async: the CPU copy of
   the state, `checkpoint.snapshot`, plus starting the writer thread), and how long the training steps that
   run during the background write take compared with steps without a save in flight (on 2 shared cores the
   writer competes with training). `--threads` sets torch's threads for the training steps (default: torch's
   own, every core): with another job on the cores, 2 threads make step times swing 10x (a thread waiting for
   its descheduled partner), so the overlap ratio is only measurable with 1.

Measured here, idle machine (2026-12-04; dd 1,220-1,650 MB/s from run to run, so ratios swing): each byte hashed
once (chunk digests, the file's derived from them) and large writes hashed on the second core while copied:
217 MB shard (default) 0.73-0.98x dd (1,170-1,200 MB/s; the two-pass version alternated the same hour
0.71-0.74x, 1,060-1,110 MB/s); 867 MB shard (--width 1024) 1.00-1.11x (the two-pass version 1.01x): with the
disk writing behind DCP, what is left at 217 MB is DCP's fixed cost per item (~50 ms for 249 items: a torch.save
archive each, planning, metadata), which a cluster-sized shard (GBs per rank) amortises. Training steps during
an async save: --threads 1 1.03-1.14x; 2 threads 1.24-1.32x (the step uses both cores the writer needs).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from models.videoar import VideoAR, VideoARConfig
from parallel.digests import DIGEST, bytes_digest
from parallel.checkpoint_format import begin_checkpoint, commit_checkpoint, shard_name, write_rank_checkpoint
from parallel.dcp_format import snapshot_slices
from trainer.checkpointing import AsyncSaver


def build(depth: int, width: int):
    torch.manual_seed(0)
    model = VideoAR(VideoARConfig(preset="custom", depth=depth, width=width, heads=max(1, width // 64),
                                  cond="class", num_classes=8), 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    layout = model.layout_for(2, [(1, 1), (2, 2), (4, 4), (8, 8)])
    feats = torch.randn(2, layout.length - layout.prefix_len, 16)
    cond = torch.zeros(2, dtype=torch.long)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(cond, feats, layout).float().pow(2).mean().backward()
        opt.step()

    train_step()  # the optimizer state exists
    state = lambda: {**{f"model/{n}": p.detach() for n, p in model.named_parameters()},  # noqa: E731
                     **{f"optim/{i}/{k}": v for i, s in enumerate(opt.state.values()) for k, v in s.items()}}
    return train_step, state


def dd_rate(directory: Path, megabytes: int) -> float:
    target = directory / "dd.bin"
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", "conv=fsync"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    target.unlink()
    return megabytes * 2**20 / seconds


def save(root: Path, step: int, state: dict) -> None:
    """What the trainer's save does on one rank: temp dir, the tensors into DCP (hashed per chunk and per file
    while written, flushed behind the writer, fsynced), the small rank shard, metadata commit, rename."""
    tmp = begin_checkpoint(root, step)
    write_rank_checkpoint(tmp, shard_name(0), {"step": step}, state, None)
    commit_checkpoint(root, step, tmp, {}, keep_last=1)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=Path("runs/bench-ckpt"), help="on the disk checkpoints use")
    parser.add_argument("--repeats", type=int, default=5, help="best of N for each measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training steps (0: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    train_step, state = build(args.depth, args.width)
    save(args.dir, 0, state())  # warm-up, and the shard size
    nbytes = sum(f.stat().st_size for f in (args.dir / "step-00000000").rglob("*") if f.is_file())
    mb = nbytes / 2**20

    dds, syncs = [], []
    for i in range(args.repeats):  # interleaved, so a change in the disk's speed during the run hits both
        dds.append(dd_rate(args.dir, max(1, round(mb))))
        syncs.append(_timed(lambda: save(args.dir, i + 1, state())))
    dd, sync_s = max(dds), min(syncs)
    payload = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy().tobytes()
    sha = nbytes / min(_timed(lambda: hashlib.sha256(payload).hexdigest()) for _ in range(args.repeats))
    xxh = nbytes / min(_timed(lambda: bytes_digest(payload)) for _ in range(args.repeats))

    step_s = min(_timed(train_step) for _ in range(args.repeats))
    stalls, during = [], []
    saver = AsyncSaver()
    for i in range(args.repeats):
        t0 = time.perf_counter()
        copy, step = snapshot_slices(state()), 100 + i
        saver.submit(lambda: save(args.dir, step, copy))
        stalls.append(time.perf_counter() - t0)
        steps = 0
        t1 = time.perf_counter()
        while saver.busy:
            train_step()
            steps += 1
        during.append((time.perf_counter() - t1) / max(steps, 1))
        saver.wait()
    async_s = min(stalls)
    shutil.rmtree(args.dir, ignore_errors=True)  # the commit empties its trash in a background thread

    params = sum(t.numel() for k, t in state().items() if k.startswith("model/"))
    print(f"VideoAR depth {args.depth} width {args.width}: {params / 1e6:.1f}M parameters + AdamW state: "
          f"shard {mb:.0f} MB, directory {args.dir}, {torch.get_num_threads()} torch threads")
    print(f"dd sequential write (fsync)      {dd / 2**20:8.1f} MB/s")
    print(f"sha256 of the shard bytes        {sha / 2**20:8.1f} MB/s   (the digest before 2026-12-03)")
    print(f"{DIGEST} of the shard bytes      {xxh / 2**20:8.1f} MB/s   (the digest now)")
    print(f"checkpoint save (sync, {DIGEST}) {nbytes / sync_s / 2**20:8.1f} MB/s   ratio to dd {nbytes / sync_s / dd:.2f}")
    print(f"training-loop stall: sync save {sync_s * 1e3:.0f} ms, async save {async_s * 1e3:.0f} ms   "
          f"async/sync {async_s / sync_s:.3f}")
    print(f"training step: {step_s * 1e3:.0f} ms alone, {min(during) * 1e3:.0f} ms while the async save writes "
          f"({min(during) / step_s:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
