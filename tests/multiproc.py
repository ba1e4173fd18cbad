"""Run a function on N local processes with torch.distributed env set (gloo on loopback, a free port)."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    try:
        fn(rank, world, *args)
    finally:
        from parallel.topology import destroy_topology
        destroy_topology()


def run_ranks(world: int, fn, *args) -> None:
    """fn(rank, world, *args) on `world` processes; raises if any of them fails."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="spawn")
