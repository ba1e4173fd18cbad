"""Block-sparse attention for the block-causal VideoAR layout (issue 17): `flex_attention` with a `BlockMask` built
from the sequence layout, never an L x L tensor.

The rule is `models.attention_mask`'s (the dense reference), evaluated per token from small tables: frame and scale
id per token (L,), the Random Frame Mask's frame visibility (B, T, T) when a stage draws one, and the text
padding's key keep (B, L). Block structure (which 128 x 128 tiles are empty, partial or full) is computed one
query tile at a time, so building the mask costs O(L^2 / 128) memory per tile row, not L^2; flex then skips the
empty tiles and applies the rule only inside partial ones.

`flex_attention` is compiled where it pays (`videoar.flex_compile`: auto = CUDA only, always, never); eager flex
is correct everywhere but materializes scores like the math SDPA kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

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


def _tile_structure(tables: MaskTables, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) tiles (B, n, n) bool, one query tile row at a time: a tile is full when every (query, key)
    pair in it is allowed, partial when some but not all are."""
    lp = tables.frame.numel()
    n = lp // TILE
    device = tables.frame.device
    keys = torch.arange(lp, device=device)
    partial = torch.zeros(batch, n, n, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    b = torch.arange(batch, device=device)[:, None, None]
    real_q = torch.arange(TILE, device=device)
    for i in range(n):
        q = (i * TILE + real_q)
        q = q[q < tables.length]  # padded queries do not decide a tile's fullness
        ok = tables.allowed(b, q[None, :, None], keys[None, None, :])  # (B, tile, Lp)
        ok = ok.view(batch, len(q), n, TILE)
        any_, all_ = ok.any(3).any(1), ok.all(3).all(1)
        partial[:, i], full[:, i] = any_ & ~all_, all_
    return partial, full


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
    partial, full = _tile_structure(tables, batch if per_sample else 1)

    def mask_mod(b, h, q, k):
        return tables.allowed(b if per_sample else 0, q, k)

    block = BlockMask.from_kv_blocks(*_indices(partial), *_indices(full), BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                     seq_lengths=(layout.length, layout.length))
    return SparseMask(block, tables, partial | full)


def visible_fraction(mask: SparseMask) -> float:
    """Share of the tiles that flex computes (partial + full): what the block sparsity saves."""
    return float(mask.tiles.float().mean())


@lru_cache(maxsize=None)
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


def should_compile(mode: str, device: torch.device) -> bool:
    """`videoar.flex_compile`: auto compiles on CUDA only; always / never as named."""
    return mode == "always" or (mode == "auto" and device.type == "cuda")


def _flex(q, k, v, mask: SparseMask, compile_mode: str):
    fn = _compiled() if should_compile(compile_mode, q.device) else flex_attention
    return fn(q, k, v, block_mask=mask.block)


def _tile_keys(mask: SparseMask, i: int) -> torch.Tensor:
    """Key positions of the tiles query tile i computes for any sample (real tokens only)."""
    cols = mask.tiles[:, i].any(0).nonzero().flatten()
    keys = (cols[:, None] * TILE + torch.arange(TILE, device=cols.device)).flatten()
    return keys[keys < mask.tables.length]


class _FlexWithTiledBackward(torch.autograd.Function):
    """flex forward, backward by query tiles over the computed key tiles only (the FlashAttention-2 backward in
    PyTorch ops, each tile's softmax recomputed): torch's flex has no CPU backward, and compiled flex on CPU
    returns no log-sum-exp. Memory: one tile row's scores."""

    @staticmethod
    def forward(ctx, q, k, v, mask: SparseMask, compile_mode: str):
        out = _flex(q.detach(), k.detach(), v.detach(), mask, compile_mode)  # flex refuses inputs with grads
        ctx.save_for_backward(q, k, v, out)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out = ctx.saved_tensors
        mask, length, scale = ctx.mask, q.shape[2], q.shape[-1] ** -0.5
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (d_out * out).sum(-1, keepdim=True)
        b = torch.arange(q.shape[0], device=q.device)[:, None, None]
        for i in range(-(-length // TILE)):
            qs = slice(i * TILE, min((i + 1) * TILE, length))
            keys = _tile_keys(mask, i)
            qpos = torch.arange(qs.start, qs.stop, device=q.device)
            allowed = mask.tables.allowed(b, qpos[None, :, None], keys[None, None, :])[:, None]
            kc, vc = k[:, :, keys], v[:, :, keys]
            s = ((q[:, :, qs] @ kc.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s, dim=-1)
            dv.index_add_(2, keys, p.transpose(-1, -2) @ d_out[:, :, qs])
            ds = p * (d_out[:, :, qs] @ vc.transpose(-1, -2) - delta[:, :, qs]) * scale
            dq[:, :, qs] = ds @ kc
            dk.index_add_(2, keys, ds.transpose(-1, -2) @ q[:, :, qs])
        return dq, dk, dv, None, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask, compile_mode: str = "auto"
           ) -> torch.Tensor:
    """Block-sparse attention over (B, H, L, hd) (compiled per `compile_mode`). On CUDA flex's own backward; on
    other devices, when a gradient is needed, flex forward + the tiled backward."""
    if q.device.type == "cuda" or not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad
                                                                        or v.requires_grad):
        return _flex(q, k, v, mask, compile_mode)
    return _FlexWithTiledBackward.apply(q, k, v, mask, compile_mode)
