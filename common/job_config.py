"""Sections of the shared config for the parallel layout (dp x pp x tp, DESIGN §4), the preprocessing job and
SLURM submission."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.validation import check, check_choice

@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel: attention heads and MLP columns split across ranks (megatron-core layers)
    pp: int = 1  # pipeline parallel: transformer blocks split into stages (torch.distributed.pipelining)
    # context (sequence) parallel: each sample's tokens split over cp ranks, Ulysses all-to-all around attention
    # (parallel/cp.py); needs pp == 1 (for now), heads / tp divisible by cp; ZeRO 0-3 reduce over dp x cp
    cp: int = 1
    zero_stage: int = 0  # DeepSpeed ZeRO stage for data parallelism (0 = plain all-reduce); needs pp == 1 if > 0
    # DeepSpeed with bf16 (CUDA): fp32 accumulates micro-batch gradients and reduces them in fp32 (safe with many
    # micro-batches; ZeRO-1 then runs BF16_Optimizer, which keeps fp32 gradients of the whole model: +4 bytes per
    # parameter per rank); bf16 reaches the ZeRO paper's memory (benchmarks.zero_memory) at bf16 precision
    grad_accum_dtype: str = "fp32"
    pp_schedule: str = "1f1b"  # 1f1b | gpipe
    stage_blocks: list[int] | None = None  # blocks per pipeline stage (sum = depth); None = as even as possible
    activation_checkpointing: bool = False  # recompute each block in backward (less memory, ~1/3 more compute)
    backend: str = "auto"  # auto (gloo on CPU, nccl on CUDA) | gloo | nccl
    timeout_s: float = 600.0  # a collective waiting longer than this fails (a peer rank is dead or hung)
    data_wait_s: float = 7200.0  # ranks > 0 wait this long for rank 0 to encode a stage's latents (not a collective)

    def __post_init__(self) -> None:
        p = "parallel"
        check(self.tp >= 1 and self.pp >= 1, f"{p}.tp/pp", f"must be >= 1, got tp={self.tp} pp={self.pp}")
        check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.cp >= 1, f"{p}.cp", f"must be >= 1, got {self.cp}")
        check(self.cp == 1 or self.pp == 1, f"{p}.cp",
              f"cp={self.cp} runs with pp=1 only so far (got pp={self.pp}): pipeline stages are not wired to the "
              "cp group yet")
        check(self.zero_stage == 0 or self.pp == 1, f"{p}.zero_stage",
              f"ZeRO stage {self.zero_stage} with pp={self.pp} is not supported: the DeepSpeed engine cannot drive "
              "torch.distributed.pipelining stages (ZeRO-2/3 never pair with pipelining, as in Megatron-DeepSpeed); "
              "use parallel.zero_stage=0 with pp > 1")
        check_choice(f"{p}.pp_schedule", self.pp_schedule, ("1f1b", "gpipe"))
        check_choice(f"{p}.grad_accum_dtype", self.grad_accum_dtype, ("fp32", "bf16"))
        check_choice(f"{p}.backend", self.backend, ("auto", "gloo", "nccl"))
        check(self.timeout_s > 0, f"{p}.timeout_s", f"must be > 0, got {self.timeout_s}")
        check(self.data_wait_s > 0, f"{p}.data_wait_s", f"must be > 0, got {self.data_wait_s}")
        if self.stage_blocks is not None:
            check(len(self.stage_blocks) == self.pp and all(b >= 1 for b in self.stage_blocks),
                  f"{p}.stage_blocks", f"needs pp={self.pp} positive block counts, got {self.stage_blocks}")

    def blocks_per_stage(self, depth: int) -> list[int]:
        if self.stage_blocks is not None:
            check(sum(self.stage_blocks) == depth, "parallel.stage_blocks",
                  f"must sum to videoar.depth={depth}, got {self.stage_blocks}")
            return list(self.stage_blocks)
        check(depth >= self.pp, "parallel.pp", f"pp={self.pp} stages need at least as many blocks, depth={depth}")
        base, extra = divmod(depth, self.pp)
        return [base + (1 if i < extra else 0) for i in range(self.pp)]


@dataclass
class PreprocessConfig:
    input: str = "runs/demo/clips"  # directory or s3://bucket/prefix of videos (+ optional .json/.txt captions)
    output: str = "runs/demo/shards"  # directory or s3://bucket/prefix; one folder per bucket <H>x<W>x<F>
    stride: int = 0  # frames between consecutive clip starts of one video (0 = the bucket's frame count)
    max_clips_per_video: int = 0  # 0 = all
    shard_bytes: int = 268_435_456  # target shard size (a shard closes once it reaches this)
    workers: int = 2  # tokenizer-encoder actors (GPU actors on a cluster)
    batch_size: int = 8  # clips per encoder call
    ray_address: str = ""  # "" = a local Ray runtime; else e.g. ray://head:10001 or "auto"

    def __post_init__(self) -> None:
        p = "preprocess"
        check(self.stride >= 0 and self.max_clips_per_video >= 0, f"{p}.stride/max_clips_per_video", "must be >= 0")
        check(self.shard_bytes >= 1024, f"{p}.shard_bytes", f"must be >= 1024, got {self.shard_bytes}")
        check(self.workers >= 1 and self.batch_size >= 1, f"{p}.workers/batch_size", "must be >= 1")


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
