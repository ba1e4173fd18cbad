"""Parallel layout config: named dimensions dp x pp x tp (DESIGN §4); dp is what remains of the world size."""

from __future__ import annotations

from dataclasses import dataclass

from models.validation import check, check_choice


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel: attention heads and MLP columns split across ranks (megatron-core layers)
    pp: int = 1  # pipeline parallel: transformer blocks split into stages (torch.distributed.pipelining)
    zero_stage: int = 0  # DeepSpeed ZeRO stage for data parallelism (0 = plain all-reduce); needs pp == 1 if > 0
    pp_schedule: str = "1f1b"  # 1f1b | gpipe
    stage_blocks: list[int] | None = None  # blocks per pipeline stage (sum = depth); None = as even as possible
    activation_checkpointing: bool = False  # recompute each block in backward (less memory, ~1/3 more compute)
    backend: str = "auto"  # auto (gloo on CPU, nccl on CUDA) | gloo | nccl
    timeout_s: float = 600.0  # a collective waiting longer than this fails (a peer rank is dead or hung)

    def __post_init__(self) -> None:
        p = "parallel"
        check(self.tp >= 1 and self.pp >= 1, f"{p}.tp/pp", f"must be >= 1, got tp={self.tp} pp={self.pp}")
        check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.zero_stage == 0 or self.pp == 1, f"{p}.zero_stage",
              f"ZeRO stage {self.zero_stage} with pp={self.pp} is not supported: the DeepSpeed engine cannot drive "
              "torch.distributed.pipelining stages (ZeRO-2/3 never pair with pipelining, as in Megatron-DeepSpeed); "
              "use parallel.zero_stage=0 with pp > 1")
        check_choice(f"{p}.pp_schedule", self.pp_schedule, ("1f1b", "gpipe"))
        check_choice(f"{p}.backend", self.backend, ("auto", "gloo", "nccl"))
        check(self.timeout_s > 0, f"{p}.timeout_s", f"must be > 0, got {self.timeout_s}")
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
