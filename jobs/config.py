"""Cluster job settings (one section of the shared config; see trainer/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.validation import check


@dataclass
class SlurmConfig:
    job_name: str = "videoar"
    nodes: int = 1
    gpus_per_node: int = 0  # 0 on CPU clusters
    nproc_per_node: int = 0  # training processes per node; 0 = gpus_per_node (or 2 without GPUs)
    cpus_per_task: int = 0  # 0 = let SLURM decide
    partition: str = ""
    account: str = ""
    time: str = "01:00:00"
    signal_grace_s: int = 120  # SIGUSR1 this long before the time limit: checkpoint, then requeue
    master_port: int = 29500
    threads_per_proc: int = 0  # OMP_NUM_THREADS per training process (0: leave as is)
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. ["--qos=high"]

    def __post_init__(self) -> None:
        p = "slurm"
        check(self.nodes >= 1, f"{p}.nodes", f"must be >= 1, got {self.nodes}")
        check(self.gpus_per_node >= 0 and self.nproc_per_node >= 0 and self.cpus_per_task >= 0,
              f"{p}.gpus_per_node/nproc_per_node/cpus_per_task", "must be >= 0")
        check(self.signal_grace_s >= 10, f"{p}.signal_grace_s", "must be >= 10 s to leave time for a checkpoint")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 2
