"""Run a function on N local processes with the torchrun environment set (loopback rendezvous on a free port).

Used by the multi-process tests and benchmarks; from a shell, `torchrun --nproc-per-node N -m trainer.train_videoar`
does the same for the trainer."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from parallel.topology import destroy_topology


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        fn(rank, world, *args)
    finally:
        destroy_topology()


def run_local(world: int, fn, *args, threads: int = 1) -> None:
    """fn(rank, world, *args) on `world` spawned processes (`fn` must be importable); raises if any fails."""
    mp.start_processes(_entry, args=(world, free_port(), threads, fn, args), nprocs=world, join=True,
                       start_method="spawn")
