"""Curriculum controller (DESIGN §6): ordered stages over the global step.

The active stage and every scheduled value (flip ratio p_max, frame mask) are pure functions of the global step,
so a resumed run computes exactly what an uninterrupted one would. The controller's state is what was consumed:
per-stage sample counts, saved in every checkpoint and checked on resume against what the current config implies
(a changed batch size or stage boundary is a clear error, not a silent data skip).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.validation import ConfigError, check


@dataclass
class StageConfig:
    name: str = "main"
    until_step: int = 200  # the stage covers global steps [previous stage's until_step, until_step)
    resolution: list[int] = field(default_factory=lambda: [64, 64])  # [height, width] of the clips
    frames: int = 9  # video frames per clip: 1 + k * tokenizer.temporal_compression
    scales: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # scale schedule; last = latent grid rows
    scales_w: list[int] | None = None  # per-axis columns for non-square grids
    global_batch: int = 4  # samples per optimizer step
    micro_batch: int = 4  # samples per forward/backward (global_batch / micro_batch accumulation steps)
    flip_start: float = 0.0  # Cross-Frame Error Correction p_max at the stage's first step ...
    flip_end: float = 0.0  # ... ramped linearly to this at its last step; 0 and 0 = plain teacher forcing
    p_mask: float = 0.0  # Random Frame Mask drop probability of each history frame (training only)
    window: int = 0  # history frames visible to a frame (0 = all)

    def __post_init__(self) -> None:
        p = f"curriculum[{self.name}]"
        check(self.until_step >= 1, f"{p}.until_step", f"must be >= 1, got {self.until_step}")
        check(len(self.resolution) == 2, f"{p}.resolution", f"must be [height, width], got {list(self.resolution)}")
        check(self.frames >= 1, f"{p}.frames", f"must be >= 1, got {self.frames}")
        check(len(self.scales) >= 1 and list(self.scales) == sorted(self.scales), f"{p}.scales",
              f"must be a non-decreasing list, got {list(self.scales)}")
        if self.scales_w is not None:
            check(len(self.scales_w) == len(self.scales), f"{p}.scales_w", "must have as many entries as scales")
        check(self.global_batch >= 1 and self.micro_batch >= 1 and self.global_batch % self.micro_batch == 0,
              f"{p}.global_batch", f"must be a positive multiple of micro_batch ({self.micro_batch}), "
              f"got {self.global_batch}")
        for name in ("flip_start", "flip_end"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"{p}.{name}", f"must be in [0, 1], got {v}")
        check(0.0 <= self.p_mask < 1.0, f"{p}.p_mask", f"must be in [0, 1), got {self.p_mask}")
        check(self.window >= 0, f"{p}.window", f"must be >= 0, got {self.window}")

    @property
    def sizes(self) -> list[tuple[int, int]]:
        cols = self.scales if self.scales_w is None else self.scales_w
        return [(int(h), int(w)) for h, w in zip(self.scales, cols)]

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.micro_batch


class Curriculum:
    def __init__(self, stages: list[StageConfig]):
        if not stages:
            raise ConfigError("curriculum: needs at least one stage")
        ends = [s.until_step for s in stages]
        if ends != sorted(set(ends)):
            raise ConfigError(f"curriculum: until_step must strictly increase across stages, got {ends}")
        self.stages = list(stages)
        self.starts = [0] + ends[:-1]
        self.consumed = [0] * len(stages)  # samples consumed per stage

    @property
    def total_steps(self) -> int:
        return self.stages[-1].until_step

    def index(self, step: int) -> int:
        """Stage index of global step `step` (0-based); the last stage continues past its end."""
        for i, s in enumerate(self.stages):
            if step < s.until_step:
                return i
        return len(self.stages) - 1

    def stage(self, step: int) -> StageConfig:
        return self.stages[self.index(step)]

    def flip_p_max(self, step: int) -> float:
        """CFEC p_max at `step`: linear from flip_start to flip_end over the stage's steps."""
        i = self.index(step)
        s, start = self.stages[i], self.starts[i]
        span = max(1, s.until_step - start - 1)
        frac = min(1.0, (step - start) / span)
        return s.flip_start + (s.flip_end - s.flip_start) * frac

    def expected_consumed(self, step: int) -> list[int]:
        """Samples each stage has consumed after `step` completed steps, as the config implies."""
        return [s.global_batch * max(0, min(step, s.until_step if i < len(self.stages) - 1 else step) - start)
                for i, (s, start) in enumerate(zip(self.stages, self.starts))]

    def record(self, step: int, samples: int) -> None:
        self.consumed[self.index(step)] += samples

    def state_dict(self) -> dict:
        return {"stages": [s.name for s in self.stages], "consumed": list(self.consumed)}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Restore consumed counts for a run resumed after `step` completed steps; refuse a mismatch."""
        names = [s.name for s in self.stages]
        if list(state["stages"]) != names:
            raise ValueError(f"checkpoint curriculum stages {list(state['stages'])} differ from the config's {names}")
        expected = self.expected_consumed(step)
        if list(state["consumed"]) != expected:
            raise ValueError(f"curriculum mismatch at step {step}: the checkpoint consumed {list(state['consumed'])} "
                             f"samples per stage {names}, the current config implies {expected} "
                             f"(were global_batch or until_step changed?)")
        self.consumed = list(state["consumed"])
