"""How `parallel/` may cut a model, as plain data the model hands over (torchtitan's `models/<m>/parallelize.py`,
as a table): `parallel/` knows no model, and a model imports nothing of `parallel/`.

A model with a plan also has three methods a pipeline stage calls, with the step's `static` argument (for
VideoAR, the token layout) first: `stage_input(static, *inputs) -> (hidden, *side)` on the first stage,
`stage_blocks(static, blocks, hidden, *side) -> hidden` on every stage, `stage_output(static, hidden)` on the last.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelPlan:
    blocks: str  # attribute holding the nn.ModuleList of repeated blocks (split into pipeline stages)
    column_parallel: tuple[str, ...]  # Linear layers inside a block split along output features (weight dim 0)
    row_parallel: tuple[str, ...]  # ... along input features (weight dim 1); their outputs are all-reduced
    tp_shared: tuple[str, ...] = ()  # modules inside a block shared by all heads: gradients summed over tp
    tp_divisible: tuple[tuple[str, int], ...] = ()  # (what, size): sizes tp must divide, for the error message
    first_stage: tuple[str, ...] = ()  # top-level modules only the first pipeline stage keeps (if present)
    last_stage: tuple[str, ...] = ()  # ... only the last
    no_weight_decay: tuple[str, ...] = ()  # parameter-name parts without weight decay (1-D parameters never have it)
    hidden_size: int = 0  # the model width (sizes DeepSpeed's communication buckets)
    # context parallelism: the attention module inside a block, whose `attend(q, k, v, mask)` (B, H, N, hd) runs
    # on the whole sequence; everything else in a block is per token. The model's `sequence_slice` attribute is
    # the token range this rank holds (set by parallel/cp.py).
    attention: str = ""
    heads: int = 0

    @property
    def tp_split(self) -> dict[str, int]:
        """Block-relative Linear name -> the weight dimension tensor parallelism splits."""
        return {**{n: 0 for n in self.column_parallel}, **{n: 1 for n in self.row_parallel}}


def tp_split_dim(param_name: str, split: dict[str, int]) -> int | None:
    """The dimension a parameter is split along under tensor parallelism (None: replicated), given a plan's
    `tp_split` (also saved in checkpoint metadata, so checkpoints are read without the model)."""
    for name, dim in split.items():
        if f".{name}." in f".{param_name}":
            return dim
    return None
