"""One place that builds the process groups: world/rank from torchrun or SLURM env, then megatron-core's
`parallel_state` groups for tp x pp (dp is the rest), in megatron's rank order (tp fastest, then dp, then pp)."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.job_config import ParallelConfig


@dataclass(frozen=True)
class Topology:
    rank: int
    world: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp: int = 1  # context parallel ranks per sample (parallel/cp.py); dp excludes them
    cp_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Topology(0, 1, 1, 1, 1, 0, 0, 0)


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun (RANK/WORLD_SIZE) or SLURM (SLURM_PROCID/SLURM_NTASKS)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def rank_device(kind: str = "cpu") -> torch.device:
    """This rank's one device: `cuda:$LOCAL_RANK` (torchrun; `SLURM_LOCALID` under srun) for "cuda", else the CPU.
    Every model, batch and collective tensor of the rank lives there."""
    if kind != "cuda":
        return torch.device(kind)
    local_rank = env_rank_world()[2]
    if not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but torch sees no CUDA device (CPU-only build, or no GPU visible: "
                           "check CUDA_VISIBLE_DEVICES and `nvidia-smi`); use run.device=cpu")
    if torch.cuda.device_count() == 1:  # one GPU per task (e.g. srun --gpus-per-task=1): it is cuda:0
        return torch.device("cuda", 0)
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible on this node; "
                           "start at most one process per GPU")
    return torch.device("cuda", local_rank)


def ensure_rendezvous_env(rank: int, world: int) -> None:
    """MASTER_ADDR/MASTER_PORT for env:// when SLURM started the ranks directly (srun, no torchrun): the first
    node of the job (the batch host runs SLURM_PROCID 0 under block distribution) and a port from the job id."""
    env = os.environ
    if world == 1 or ("MASTER_ADDR" in env and "MASTER_PORT" in env) or "SLURM_PROCID" not in env:
        return
    host = env.get("SLURM_LAUNCH_NODE_IPADDR")
    if "MASTER_ADDR" not in env and not host:
        raise RuntimeError("rank %d of %d: started by SLURM without MASTER_ADDR and without SLURM_LAUNCH_NODE_IPADDR; "
                           "export MASTER_ADDR=<first node> and MASTER_PORT in the sbatch script" % (rank, world))
    env.setdefault("MASTER_ADDR", host)
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def loopback_store(rank: int, world: int, timeout: timedelta) -> dist.TCPStore | None:
    """The rendezvous store of a single-node job (MASTER_ADDR is a loopback address) listening on that address
    only: torch's TCPStore binds every interface by default, visible to the whole network. Rank 0 binds the
    socket itself and hands it over (`master_listen_fd`). None otherwise (env:// as usual, multi-node)."""
    host, port = os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0") or 0)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback or not port:
        return None
    listen = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listen = socket.socket(family, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listen.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        except OSError as e:
            listen.close()
            raise RuntimeError(f"rank 0: cannot listen on {host}:{port} for the rendezvous ({e}); another job "
                               "holds the port: set MASTER_PORT (jobs.launch --master-port)") from None
        listen.listen(world)
    # detach: the store owns the listening descriptor from here on (Python must not close it when collected)
    return dist.TCPStore(host, port, world, rank == 0, timeout=timeout,
                         master_listen_fd=listen.detach() if listen else None)


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, layout: dict[str, int], cp_rank: int = 0) -> int:
    """megatron-core's rank order (tp-cp-dp-pp), which checkpoints assume:
    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank)); cp = 1 for layouts saved without it."""
    cp = layout.get("cp", 1)
    return tp_rank + layout["tp"] * (cp_rank + cp * (dp_rank + layout["dp"] * pp_rank))


def init_topology(cfg: ParallelConfig, device: str = "cpu") -> Topology:
    """Initialise torch.distributed (if not yet) and megatron-core's groups; a single process needs nothing."""
    rank, world, _ = env_rank_world()
    if dist.is_initialized():  # a launcher (e.g. Ray Train) already built the default group
        rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1 and cfg.tp == 1 and cfg.pp == 1 and cfg.cp == 1:
        return SINGLE
    if world % (cfg.tp * cfg.pp * cfg.cp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp x pp x cp = {cfg.tp} x {cfg.pp} x "
                         f"{cfg.cp}")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(rank_device("cuda"))
    if not dist.is_initialized():
        ensure_rendezvous_env(rank, world)
        timeout = timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                store=loopback_store(rank, world, timeout))
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
                                 context_parallel_size=cfg.cp, create_gloo_process_groups=backend != "gloo",
                                 distributed_timeout_minutes=cfg.timeout_s / 60)
    topo = Topology(rank, world, cfg.tp, cfg.pp, world // (cfg.tp * cfg.pp * cfg.cp),
                    ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                    ps.get_data_parallel_rank(), cfg.cp, ps.get_context_parallel_rank())
    layout = {"tp": topo.tp, "dp": topo.dp, "cp": topo.cp}
    if rank_of(topo.tp_rank, topo.dp_rank, topo.pp_rank, layout, topo.cp_rank) != rank:
        raise RuntimeError(f"rank {rank}: megatron-core placed it at tp {topo.tp_rank}, cp {topo.cp_rank}, dp "
                           f"{topo.dp_rank}, pp {topo.pp_rank}, not in the tp-cp-dp-pp order checkpoints assume")
    return topo


def destroy_topology() -> None:
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()


_COLLECTIVE_FAILURE = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe")


def describe_failure(error: BaseException, topo: Topology, timeout_s: float) -> BaseException:
    """A failed or timed-out collective as an error naming this rank and its place in the layout (the raw gloo
    or NCCL message names neither); any other error is returned unchanged."""
    text = str(error)
    if not (isinstance(error, dist.DistError) or any(k in text.lower() for k in _COLLECTIVE_FAILURE)):
        return error
    return RuntimeError(
        f"rank {topo.rank} of {topo.world} (tp {topo.tp_rank}, dp {topo.dp_rank}, pp {topo.pp_rank}): a collective "
        f"failed or waited longer than parallel.timeout_s={timeout_s:g} s; another rank has probably died or hung "
        f"(see its log). Cause: {text.splitlines()[0] if text else type(error).__name__}")
