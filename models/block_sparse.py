"""Block-sparse attention for the block-causal VideoAR layout (issue 17): `flex_attention` with a `BlockMask` built
from the sequence layout, never an L x L tensor.

The rule is `models.attention_mask`'s (the dense reference), evaluated per token from small tables: frame and scale
id per token (L,), the Random Frame Mask's frame visibility (B, T, T) when a stage draws one, and the text
padding's key keep (B, L). Block structure (which 128 x 128 tiles are empty, partial or full) is counted per
(frame, scale) group, never per pair; flex then skips the empty tiles and applies the rule only inside partial
ones.

Kernels (`videoar.sparse_kernel`): `flex` = compiled flex_attention (auto on CUDA, with flex's own backward);
`tiled` = SDPA per query tile against its computed key tiles only (auto on CPU: compiled flex on CPU is slower per
FLOP than SDPA's flash kernel and has no backward); `flex_eager` = uncompiled flex (tests; it materializes
scores). Off CUDA every kernel's backward is the tiled one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from common.model_config import SPARSE_KERNELS
from models.layout import SequenceLayout

TILE = 128  # flex's default sparse block size (query and key tiles)


@dataclass(frozen=True)
class MaskTables:
    """Per-token tables of the block-causal rule, padded to whole tiles (padding: frame -2, never visible)."""
    frame: torch.Tensor  # (Lp,) latent frame per token, -1 prefix, -2 padding
    scale: torch.Tensor  # (Lp,)
    visibility: torch.Tensor | None  # (B, T, T) bool: frame t may read history frame t' (frame_visibility)
    keep: torch.Tensor | None  # (B, Lp) bool: key is not text padding
    length: int  # real tokens L

    def allowed(self, b, q, k):
        """The block-causal rule at (sample b, query q, key k); index tensors broadcast (mask_mod and tiles)."""
        fq, fk = self.frame[q], self.frame[k]
        video_q, video_k = fq >= 0, fk >= 0
        prefix_key = fk == -1
        same = (fq == fk) & (self.scale[k] <= self.scale[q]) & video_q
        if self.visibility is None:
            history = video_k & (fk < fq)
        else:
            history = self.visibility[b, fq.clamp(min=0), fk.clamp(min=0)] & video_q & video_k
        out = prefix_key | same | history
        return out if self.keep is None else out & self.keep[b, k]


def _tables(layout: SequenceLayout, visibility, keep, device) -> MaskTables:
    frame, scale = layout.token_ids()
    padded = -(-layout.length // TILE) * TILE
    pad = padded - layout.length
    frame = torch.cat([frame, frame.new_full((pad,), -2)]).to(device)
    scale = torch.cat([scale, scale.new_zeros(pad)]).to(device)
    if keep is not None:
        keep = torch.cat([keep.bool(), keep.new_zeros(keep.shape[0], pad, dtype=torch.bool)], dim=1).to(device)
    if visibility is not None:
        visibility = visibility.bool().to(device)
    return MaskTables(frame, scale, visibility, keep, layout.length)


def _tile_structure(layout: SequenceLayout, tables: MaskTables, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) tiles (B, n, n) bool: a tile is full when every (query, key) pair in it is allowed, partial
    when some but not all are. Counted without touching pairs: the rule is constant over a group (one prefix token,
    or one (frame, scale) block), so with C[i, g] = tokens of group g in tile i and A[g, g'] the group rule, the
    allowed pairs of tile (i, j) are (C A C'^T)[i, j], C' counting only kept keys. O(n G + G^2) for G groups."""
    device, n = tables.frame.device, tables.frame.numel() // TILE
    P = layout.prefix_len
    starts = list(range(P)) + [blk.start for blk in layout.blocks]
    ends = list(range(1, P + 1)) + [blk.end for blk in layout.blocks]
    rep = torch.tensor(starts, device=device)  # a token of each group
    group = torch.repeat_interleave(torch.arange(len(starts), device=device),
                                    torch.tensor(ends, device=device) - rep)  # (L,) group per real token
    tile = torch.arange(layout.length, device=device) // TILE
    counts = torch.zeros(n, len(starts), dtype=torch.float64, device=device)
    counts.index_put_((tile, group), torch.ones(layout.length, dtype=torch.float64, device=device), accumulate=True)
    rule = dataclasses.replace(tables, keep=None)
    b = torch.arange(batch, device=device)[:, None, None]
    groups = rule.allowed(b, rep[None, :, None], rep[None, None, :]).to(torch.float64)  # (B, G, G)
    key_counts = counts.expand(batch, -1, -1)
    if tables.keep is not None:
        key_counts = key_counts * tables.keep[:batch, rep].to(torch.float64)[:, None, :]  # (B, n, G)
    pairs = counts @ groups @ key_counts.transpose(1, 2)
    real = counts.sum(1)  # tokens per tile
    full = pairs == real[:, None] * real[None, :]
    return (pairs > 0) & ~full, full


def _indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, n) bool tiles -> (B, 1, n) counts and (B, 1, n, n) int32 column indices, chosen ones first."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


@dataclass(frozen=True)
class SparseMask:
    """What the model passes to attention instead of an L x L tensor: flex's `BlockMask`, the rule's tables and
    the computed tiles (B|1, n, n) (partial or full) that the CPU backward walks."""
    block: BlockMask
    tables: MaskTables
    tiles: torch.Tensor
    full: torch.Tensor  # (B|1, n, n) tiles whose every pair is allowed


def block_mask(layout: SequenceLayout, batch: int, visibility: torch.Tensor | None = None,
               keep: torch.Tensor | None = None, device: torch.device | str = "cpu") -> SparseMask:
    """The layout's block-causal mask for flex for `batch` samples: with `visibility` (B, T, T) (Random Frame Mask
    / window) and `keep` (B, L) (text padding keys) when given. Equal, pair by pair, to
    `block_causal_mask(layout, visibility)` & keep (tests/test_block_sparse.py)."""
    if visibility is not None and visibility.shape != (batch, layout.num_frames, layout.num_frames):
        raise ValueError(f"visibility must be ({batch}, {layout.num_frames}, {layout.num_frames}), "
                         f"got {tuple(visibility.shape)}")
    if keep is not None and keep.shape != (batch, layout.length):
        raise ValueError(f"key keep must be ({batch}, {layout.length}), got {tuple(keep.shape)}")
    tables = _tables(layout, visibility, keep, device)
    per_sample = visibility is not None or keep is not None
    partial, full = _tile_structure(layout, tables, batch if per_sample else 1)

    def mask_mod(b, h, q, k):
        return tables.allowed(b if per_sample else 0, q, k)

    block = BlockMask.from_kv_blocks(*_indices(partial), *_indices(full), BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                     seq_lengths=(layout.length, layout.length))
    return SparseMask(block, tables, partial | full, full)


def visible_fraction(mask: SparseMask) -> float:
    """Share of the tiles that flex computes (partial + full): what the block sparsity saves."""
    return float(mask.tiles.float().mean())


@lru_cache(maxsize=None)
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask: SparseMask, kernel: str):
    fn = flex_attention if kernel == "flex_eager" else _compiled()
    return fn(q, k, v, block_mask=mask.block)


def _span(cols: torch.Tensor, length: int) -> slice | torch.Tensor:
    """Key positions of tile columns `cols` (real tokens only): a slice when contiguous (no copy)."""
    keys = (cols[:, None] * TILE + torch.arange(TILE, device=cols.device)).flatten()
    keys = keys[keys < length]
    first = int(keys[0]) if len(keys) else 0
    return slice(first, first + len(keys)) if len(keys) and int(keys[-1]) == first + len(keys) - 1 else keys


def _allowed(mask: SparseMask, qs: slice, keys: slice | torch.Tensor, batch: int, device) -> torch.Tensor:
    """(B, 1, tq, m) bool: the rule between the queries `qs` and the key positions `keys`."""
    kpos = torch.arange(keys.start, keys.stop, device=device) if isinstance(keys, slice) else keys
    qpos = torch.arange(qs.start, qs.stop, device=device)
    b = torch.arange(batch, device=device)[:, None, None]
    return mask.tables.allowed(b, qpos[None, :, None], kpos[None, None, :])[:, None]


def _rows(mask: SparseMask, q: torch.Tensor):
    """Per query tile: (query slice, key positions of its computed tiles for any sample, allowed)."""
    length = q.shape[2]
    for i in range(-(-length // TILE)):
        qs = slice(i * TILE, min((i + 1) * TILE, length))
        keys = _span(mask.tiles[:, i].any(0).nonzero().flatten(), length)
        yield qs, keys, _allowed(mask, qs, keys, q.shape[0], q.device)


def _flash_with_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention and its log-sum-exp (B, H, N): the CPU flash kernel SDPA dispatches to."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]


def _tiled_forward(q, k, v, mask: SparseMask) -> torch.Tensor:
    """Block-sparse forward by query tiles: per tile row, the keys of tiles full for every sample through the
    unmasked flash kernel, the keys of partial tiles with the rule evaluated on them only, merged by their
    log-sum-exps. Hidden tiles are never touched."""
    out, length, scale = torch.empty_like(q), q.shape[2], q.shape[-1] ** -0.5
    for i in range(-(-length // TILE)):
        qs = slice(i * TILE, min((i + 1) * TILE, length))
        qi = q[:, :, qs]
        full = mask.full[:, i].all(0)
        parts = []
        if full.any():
            keys = _span(full.nonzero().flatten(), length)
            parts.append(_flash_with_lse(qi, k[:, :, keys], v[:, :, keys]))
        partial = mask.tiles[:, i].any(0) & ~full
        if partial.any():
            keys = _span(partial.nonzero().flatten(), length)
            allowed = _allowed(mask, qs, keys, q.shape[0], q.device)
            s = ((qi @ k[:, :, keys].transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
            lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])  # rows without a partial key: p = 0
            parts.append((p @ v[:, :, keys], lse))
        if not parts:  # no key visible to this tile row (every key padding): zeros, as flex gives such rows
            out[:, :, qs] = 0
        elif len(parts) == 1:
            out[:, :, qs] = parts[0][0]
        else:
            (o1, l1), (o2, l2) = parts
            top = torch.maximum(l1, l2)
            w1, w2 = torch.exp(l1 - top)[..., None], torch.exp(l2 - top)[..., None]
            out[:, :, qs] = (o1 * w1 + o2 * w2) / (w1 + w2)
    return out


def _add(buf: torch.Tensor, keys, value: torch.Tensor) -> None:
    if isinstance(keys, slice):
        buf[:, :, keys] += value
    else:
        buf.index_add_(2, keys, value)


class _TiledBackward(torch.autograd.Function):
    """Forward by flex or by `_tiled_forward`, backward by query tiles over the computed key tiles only (the
    FlashAttention-2 backward in PyTorch ops, each tile's softmax recomputed): torch's flex has no CPU backward,
    and compiled flex on CPU returns no log-sum-exp. Memory: one tile row's scores."""

    @staticmethod
    def forward(ctx, q, k, v, mask: SparseMask, kernel: str):
        q_, k_, v_ = q.detach(), k.detach(), v.detach()  # flex refuses inputs that require grads
        out = _tiled_forward(q_, k_, v_, mask) if kernel == "tiled" else _flex(q_, k_, v_, mask, kernel)
        ctx.save_for_backward(q, k, v, out)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (d_out * out).sum(-1, keepdim=True)
        for qs, keys, allowed in _rows(ctx.mask, q):
            kc, vc = k[:, :, keys], v[:, :, keys]
            s = ((q[:, :, qs] @ kc.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no allowed key: p = 0, as its output is 0
            _add(dv, keys, p.transpose(-1, -2) @ d_out[:, :, qs])
            ds = p * (d_out[:, :, qs] @ vc.transpose(-1, -2) - delta[:, :, qs]) * scale
            dq[:, :, qs] = ds @ kc
            _add(dk, keys, ds.transpose(-1, -2) @ q[:, :, qs])
        return dq, dk, dv, None, None


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """`videoar.sparse_kernel`: auto = compiled flex on CUDA, the tiled SDPA path elsewhere (compiled flex on CPU
    is ~3x slower per FLOP than SDPA's flash kernel, benchmarks/attention_memory.py)."""
    if kernel not in SPARSE_KERNELS:
        raise ValueError(f"sparse attention kernel {kernel!r} is not one of {list(SPARSE_KERNELS)}")
    return ("flex" if device.type == "cuda" else "tiled") if kernel == "auto" else kernel


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask, kernel: str = "auto"
           ) -> torch.Tensor:
    """Block-sparse attention over (B, H, L, hd) with `kernel` (`resolve_kernel`). On CUDA flex's own backward;
    elsewhere, when a gradient is needed, the tiled backward."""
    kernel = resolve_kernel(kernel, q.device)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if kernel != "tiled" and q.device.type == "cuda":
        return _flex(q, k, v, mask, kernel)
    if kernel != "tiled" and not needs_grad:  # flex off CUDA refuses inputs that require grads, even unused
        return _flex(q.detach(), k.detach(), v.detach(), mask, kernel)
    if kernel == "tiled" and not needs_grad:
        return _tiled_forward(q, k, v, mask)
    return _TiledBackward.apply(q, k, v, mask, kernel)
