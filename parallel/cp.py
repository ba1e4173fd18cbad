"""Context (sequence) parallelism, Ulysses style (DeepSpeed-Ulysses; InfinityStar trains this way): each of the cp
ranks of a group holds a contiguous 1/cp of a sample's tokens through every per-token layer (embeddings, MLPs,
norms, head, loss), and around attention an all-to-all swaps sequence for heads, so attention runs on the whole
sequence with H/cp heads (then the reverse all-to-all). Activations per rank: 1/cp of the sequence's.

What the model hands over (`ParallelPlan.attention`, `.heads`): the attention module inside each block, whose
`attend(q, k, v, mask)` this module wraps per instance, and the model's `sequence_slice` attribute, set to the
rank's token range (RoPE angles are sliced with the tokens before the exchange; the mask is the full sequence's).
The loss of a rank's tokens is a share of the sample's mean (`local_loss_scale`); gradients of the replicated
parameters are summed over the cp group (as over data parallel).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from common.parallel_plan import ParallelPlan
from parallel.collectives import all_reduce_packed, all_to_all


def sequence_slice(length: int, cp: int, cp_rank: int) -> slice:
    """The contiguous tokens rank `cp_rank` of cp holds; the sequence must split evenly."""
    if length % cp:
        raise ValueError(f"context parallel: a sequence of {length} tokens does not split over parallel.cp={cp} "
                         f"ranks (choose cp dividing prefix + frames x tokens per frame)")
    n = length // cp
    return slice(cp_rank * n, (cp_rank + 1) * n)


def seq_to_heads(x: torch.Tensor, cp: int, group) -> torch.Tensor:
    """(B, H, N/cp, hd) on each rank (its tokens, all heads) -> (B, H/cp, N, hd) (all tokens, its heads)."""
    b, h, n, d = x.shape
    chunks = x.view(b, cp, h // cp, n, d).transpose(0, 1)  # chunk j: the heads rank j will own
    got = all_to_all(chunks.contiguous(), group)  # chunk j: rank j's tokens of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * n, d)


def heads_to_seq(x: torch.Tensor, cp: int, group) -> torch.Tensor:
    """The inverse re-layout: (B, H/cp, N, hd) -> (B, H, N/cp, hd)."""
    b, hl, n, d = x.shape
    chunks = x.view(b, hl, cp, n // cp, d).permute(2, 0, 1, 3, 4)  # chunk j: rank j's tokens of my heads
    got = all_to_all(chunks.contiguous(), group)  # chunk j: my tokens of rank j's heads
    return got.transpose(0, 1).reshape(b, cp * hl, n // cp, d)


def ulysses_attend(q, k, v, mask, *, inner, cp: int, group):
    """Attention over the full sequence from per-rank token slices: 3 all-to-alls in, 1 out."""
    q, k, v = (seq_to_heads(t, cp, group) for t in (q, k, v))
    return heads_to_seq(inner(q, k, v, mask), cp, group)


def apply_context_parallel(model: nn.Module, plan: ParallelPlan, cp: int, cp_rank: int, group,
                           length: int | None = None) -> None:
    """Wrap every block's attention for the cp group and (if `length` is known) set the model's token slice.
    Heads on this rank (after tensor parallelism) must split over cp."""
    if not plan.attention:
        raise ValueError("the model's parallel plan names no attention module: context parallelism needs one")
    for block in getattr(model, plan.blocks):
        if isinstance(block, nn.Identity):  # another pipeline stage's block
            continue
        attn = block.get_submodule(plan.attention)
        heads = attn.qkv.weight.shape[0] // (3 * attn.head_dim) if hasattr(attn, "qkv") else plan.heads
        if heads % cp:
            raise ValueError(f"context parallel: {heads} attention heads per rank do not split over "
                             f"parallel.cp={cp} (heads / tp must be a multiple of cp)")
        inner = type(attn).attend.__get__(attn)
        attn.attend = partial(ulysses_attend, inner=inner, cp=cp, group=group)
    if length is not None:
        set_sequence(model, length, cp, cp_rank)


def set_sequence(model: nn.Module, length: int, cp: int, cp_rank: int) -> slice:
    """Point the model at this rank's tokens of a `length`-token sequence (per layout: stages change it)."""
    model.sequence_slice = sequence_slice(length, cp, cp_rank)
    return model.sequence_slice


def local_video_slice(prefix_len: int, length: int, cp: int, cp_rank: int) -> slice:
    """The rank's video tokens in video coordinates (targets and token weights are indexed by them)."""
    sl = sequence_slice(length, cp, cp_rank)
    return slice(max(sl.start, prefix_len) - prefix_len, max(sl.stop, prefix_len) - prefix_len)


def local_loss_scale(local_tokens: int, total_tokens: int, cp: int) -> float:
    """Factor on a rank's mean loss over its `local_tokens` so that the mean over the cp group of the scaled
    losses (what averaging gradients over dp x cp computes) is the sample's mean over `total_tokens`."""
    return cp * local_tokens / total_tokens


def local_objective(objective, micro: list, cp: int, cp_rank: int, share: float = 1.0):
    """The objective of this rank's video tokens (`objective.sliced`), its loss scaled so that averaging the
    gradients over dp x cp (`share` = 1: our engine) or summing them over cp and averaging over dp (`share` =
    1 / cp: DeepSpeed-Ulysses' convention) gives the sample mean's. The micro-batches' layout (`static`) gives
    the sequence and prefix lengths."""
    if cp == 1:
        return objective
    static = micro[0].static
    video = local_video_slice(static.prefix_len, static.length, cp, cp_rank)
    n_video = static.length - static.prefix_len
    return objective.sliced(video, share * local_loss_scale(video.stop - video.start, n_video, cp))


def reduce_over_cp(loss: torch.Tensor, stats: list[torch.Tensor], cp: int, group, share: float = 1.0
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The sample's loss and statistics from the ranks' parts: the scaled losses averaged (`share` as in
    `local_objective`), the full-size statistics (zeros outside each rank's tokens) summed."""
    if cp == 1:
        return loss, stats
    loss, *stats = all_reduce_packed([loss.to(stats[0].device), *stats], group)
    return loss / (cp * share), stats
