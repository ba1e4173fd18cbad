"""Curriculum controller (DESIGN §6): ordered stages over the global step.

The active stage and every scheduled value (flip ratio p_max, frame mask) are pure functions of the global step,
so a resumed run computes exactly what an uninterrupted one would. What was consumed (per-stage sample counts)
is the loader's state (data_pipeline/loader.py `StreamingLoader`); `check_consumed` compares it on resume with
what the current config implies (a changed batch size or stage boundary is a clear error, not a silent data skip).

A stage that mixes images and clips (`image_batch`) has two data streams, one per part (`StageConfig.parts`);
`streams` lists every stage's parts in order, each with its own samples-consumed count.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from common.train_config import StageConfig, check_stage_order
from common.validation import ConfigError


class Curriculum:
    def __init__(self, stages: list[StageConfig]):
        check_stage_order(stages)
        ends = [s.until_step for s in stages]
        self.stages = list(stages)
        self.starts = [0] + ends[:-1]
        # (stage index, part) of every data stream; a video-only stage has one, named as the stage
        self.streams = [(i, part) for i, s in enumerate(self.stages) for part in s.parts()]

    @property
    def stream_names(self) -> list[str]:
        return [part.name for _, part in self.streams]

    def stage_streams(self, index: int) -> list[tuple[int, "StageConfig"]]:
        """(stream index, part) of stage `index`'s parts: the clips first, then the images."""
        return [(j, part) for j, (i, part) in enumerate(self.streams) if i == index]

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
        """Samples each data stream (`streams`) has consumed after `step` completed steps, as the config implies."""
        last = len(self.stages) - 1
        steps = [max(0, min(step, s.until_step if i < last else step) - start)
                 for i, (s, start) in enumerate(zip(self.stages, self.starts))]
        return [part.global_batch * steps[i] for i, part in self.streams]

    def check_consumed(self, consumed: list[int], step: int) -> None:
        """Refuse a resume after `step` completed steps whose data position (samples consumed per stage, the
        loader's state) differs from what the current config implies."""
        expected = self.expected_consumed(step)
        if list(consumed) != expected:
            names = self.stream_names
            raise ValueError(f"curriculum mismatch at step {step}: the checkpoint consumed {list(consumed)} "
                             f"samples per data stream {names}, the current config implies {expected} "
                             f"(were global_batch or until_step changed?)")


def resolve_micro_batches(stages: list[StageConfig], dp: int, tokens_of: Callable[[StageConfig], int]
                          ) -> list[StageConfig]:
    """Stages with `micro_batch_tokens` > 0 get the largest micro-batch whose samples fit the budget (the
    longest part's sequence, `tokens_of(part)`, counts) and that divides every part's per-rank share, so the
    global batch stays a whole number of micro-batches on every data-parallel rank."""
    out = []
    for s in stages:
        if not s.micro_batch_tokens:
            out.append(s)
            continue
        longest = max(tokens_of(part) for part in s.parts())
        shares = [part.global_batch // dp for part in s.parts()]
        if any(part.global_batch % dp for part in s.parts()) or min(shares) < 1:
            raise ConfigError(f"curriculum[{s.name}]: each part of global_batch={s.global_batch} must divide over "
                              f"{dp} data-parallel ranks")
        fits = [m for m in range(1, min(shares) + 1)
                if all(n % m == 0 for n in shares) and m * longest <= s.micro_batch_tokens]
        if not fits:
            raise ConfigError(f"curriculum[{s.name}].micro_batch_tokens={s.micro_batch_tokens}: one sample already has "
                              f"{longest} tokens; raise the budget or shorten the stage's clips")
        out.append(replace(s, micro_batch=fits[-1]))
    return out
