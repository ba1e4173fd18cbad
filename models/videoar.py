"""The VideoAR transformer (DESIGN §3.2-3.5): condition prefix + (frame, scale) blocks, block-causal attention with
Multi-scale Temporal RoPE (or a flat 1-D RoPE, `videoar.rope=flat`), LLaMA-style blocks and a bitwise head
(2 logits per bit).

The model sees continuous *features* (B, L_video, d): the accumulated reconstruction before each block,
down-sampled to the block's size (built by `models.sequence_inputs` in training and by `models.sampler` when
sampling, with the same quantizer functions). It projects them, adds a learned scale embedding, and puts the
learned SOS embedding on frame 0's first scale. `forward` runs a whole sequence; `forward_block` runs one
(frame, scale) block against a `KVCache`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from models.attention_mask import block_causal_mask
from models.block_sparse import SparseMask, attend, block_mask
from models.layout import Block, SequenceLayout
from models.rope import apply_rope, rope_angles, rope_rotation
from common.model_config import VideoARConfig
from common.parallel_plan import ParallelPlan


class KVCache:
    """Per-layer keys and values of the tokens already processed, preallocated. With a frame `window` w > 0 (the
    Random Frame Mask's window, DESIGN §3.3) it holds the prefix and the last w + 1 frames only: a frame's first
    block evicts the frame that left the window, so memory is bounded by the window, not the video's length.
    Keys are cached after RoPE, so eviction changes no position; what is cached is exactly what the next block may
    attend to (the prefix, the visible history, the frame's earlier scales)."""

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 prefix_len: int = 0, frame_len: int = 0, window: int = 0):
        if window < 0 or (window > 0 and frame_len < 1):
            raise ValueError(f"KV cache window must be >= 0 frames (with frame_len >= 1), got {window}")
        self.prefix_len, self.frame_len, self.window = prefix_len, frame_len, window
        self.capacity = max_len if window == 0 else min(max_len, prefix_len + (window + 1) * frame_len)
        shape = (batch, heads, self.capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.length = 0  # tokens of the sequence processed by every layer (positions)
        self.stored = 0  # tokens held in the buffers (= length without eviction)
        self.frames_held = 0  # frames (complete or begun) held after the prefix
        # (B, capacity) bool: False at text padding (set by the first block); the prefix is never evicted
        self.key_keep: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.stored + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens, asked for {end}")
        self.k[layer][:, :, self.stored:end] = k
        self.v[layer][:, :, self.stored:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def commit(self, tokens: int) -> None:
        """Every layer has written `tokens` more."""
        self.length += tokens
        self.stored += tokens

    def begin_frame(self) -> None:
        """Called before a frame's first block: with a window, drop the oldest frame once w frames are held."""
        if self.window and self.frames_held > self.window:
            lo, n = self.prefix_len, self.frame_len
            for buf in self.k + self.v:  # shift the kept frames down by one frame (copy: the ranges overlap)
                buf[:, :, lo:self.stored - n] = buf[:, :, lo + n:self.stored].clone()
            self.stored -= n
            self.frames_held -= 1
        self.frames_held += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: VideoARConfig):
        super().__init__()
        self.heads, self.head_dim, self.sparse_kernel = cfg.heads, cfg.head_dim, cfg.sparse_kernel
        # qkv output is laid out (heads, 3, head_dim) so a column split by heads keeps each head's q, k, v together
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, -1, 3, self.head_dim).transpose(1, 2).unbind(3)  # (B, H, N, hd)
        # QK-norm and RoPE in fp32 (RoPE computes in fp32 anyway; RMSNorm's fused kernel needs input dtype =
        # weight dtype): under bf16 autocast q and k stay fp32 up to the attention kernel
        q, k = apply_rope(self.q_norm(q.float()), rotation), apply_rope(self.k_norm(k.float()), rotation)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = self.attend(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """(B, H, N, hd) attention over the whole sequence: SDPA with a dense mask or the block-sparse kernel.
        Context parallelism (parallel/cp.py) wraps it per instance with its all-to-all re-layout. Under bf16
        autocast on a CPU it runs in fp32: the CPU flash kernel's bf16 backward is slower than its fp32 one (demo
        full-stage step: 0.240 s with bf16 attention, 0.207 s with fp32 attention and bf16 GEMMs, 0.236 s all fp32)."""
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                out = _attend(q.float(), k.float(), v.float(), mask, self.sparse_kernel)
            return out.to(torch.get_autocast_dtype("cpu"))
        return _attend(q, k, v, mask, self.sparse_kernel)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, sparse_kernel: str) -> torch.Tensor:
    if isinstance(mask, SparseMask):
        return attend(q, k, v, mask, sparse_kernel)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SwiGLU(nn.Module):
    def __init__(self, cfg: VideoARConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: VideoARConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rotation, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), rotation, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


@dataclass(frozen=True)
class LayoutTensors:
    """Everything derived from a layout that a forward needs; computed once per layout."""
    scale_ids: torch.Tensor  # (L_video,) scale index per video token
    angles: torch.Tensor  # (L, head_dim/2) RoPE angles, prefix included
    rotation: torch.Tensor  # (L, head_dim/2) complex e^(i*angles): what the blocks rotate by
    sos: slice  # video-token range of frame 0, scale 0


@lru_cache(maxsize=32)
def layout_tensors(layout: SequenceLayout, head_dim: int, base: float, stretch: bool, rope: str,
                   device: torch.device = torch.device("cpu"), grid: int = 0) -> LayoutTensors:
    """Built once per (layout, RoPE settings, device), on the device the model's parameters live on."""
    _, scale = layout.token_ids()
    first = layout.blocks[0]
    angles = rope_angles(layout.positions(stretch, rope, grid), head_dim, base).float()
    return LayoutTensors(scale[layout.prefix_len:].to(device), angles.to(device), rope_rotation(angles).to(device),
                         slice(0, first.end - layout.prefix_len))


@lru_cache(maxsize=8)
def layout_mask(layout: SequenceLayout, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(L, L) block-causal bool mask of the full-sequence forward; the KV-cached blocks need none."""
    return block_causal_mask(layout, device=device)


class VideoAR(nn.Module):
    def __init__(self, cfg: VideoARConfig, latent_dim: int, init_seed: int = 0):
        super().__init__()
        self.cfg, self.latent_dim, self.init_seed = cfg, latent_dim, init_seed
        w = cfg.width
        if cfg.cond == "text":
            self.cond_proj = nn.Linear(cfg.text_dim, w)
        else:
            self.class_embed = nn.Embedding(cfg.num_classes, w)
        self.null_prefix = nn.Parameter(torch.zeros(cfg.prefix_len, w))
        self.sos_embed = nn.Parameter(torch.zeros(w))
        self.scale_embed = nn.Embedding(cfg.max_scales, w)
        self.feature_dim = cfg.feature_dim(latent_dim)
        self.input_proj = nn.Linear(self.feature_dim, w)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(w, eps=1e-6)
        self.head = nn.Linear(w, 2 * latent_dim)
        self.checkpoint_blocks = False  # activation checkpointing (parallel.activation_checkpointing)
        self.sequence_slice: slice | None = None  # context parallel: this rank's tokens of the full sequence
        self.reset_parameters()

    def reset_parameters(self, names: set[str] | None = None) -> None:
        """Initialize every parameter (or those in `names`) from its own generator, seeded by (init_seed, name):
        a parameter's value does not depend on which others exist, so a pipeline rank that built only its stage
        (the rest on the meta device) initializes exactly what the single-process model holds. Meta parameters
        are skipped. Normal(init_std) for matrices, embeddings and the start token; residual output projections
        scaled by 1/sqrt(2 depth) (GPT-2 / Megatron); biases 0; norm weights 1; the head 0 (p = 1/2 per bit)."""
        std, depth = self.cfg.init_std, self.cfg.depth
        residual = {f"blocks.{i}.{m}.weight" for i in range(depth) for m in ("attn.proj", "mlp.down")}
        for name, p in self.named_parameters():
            if p.is_meta or (names is not None and name not in names):
                continue
            g = torch.Generator().manual_seed((self.init_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            value = torch.empty(p.shape, dtype=torch.float32)
            if name.startswith("head.") or name.endswith("bias"):
                value.zero_()
            elif name in residual:
                value.normal_(0.0, std / math.sqrt(2 * depth), generator=g)
            elif p.dim() >= 2 or name == "sos_embed":
                value.normal_(0.0, std, generator=g)
            else:
                value.fill_(1.0)
            with torch.no_grad():
                p.copy_(value)

    # -- pieces ------------------------------------------------------------------------------------------------
    def layout_for(self, num_frames: int, sizes: list[tuple[int, int]] | tuple) -> SequenceLayout:
        if len(sizes) > self.cfg.max_scales:
            raise ValueError(f"{len(sizes)} scales, but videoar.max_scales={self.cfg.max_scales}")
        return SequenceLayout(self.cfg.prefix_len, num_frames, tuple(tuple(map(int, s)) for s in sizes),
                              self.cfg.prev_frame_input)

    def tensors(self, layout: SequenceLayout) -> LayoutTensors:
        return layout_tensors(layout, self.cfg.head_dim, self.cfg.rope_base, self.cfg.rope_stretch, self.cfg.rope,
                              self.device, self.cfg.rope_grid)

    @property
    def device(self) -> torch.device:
        """Where this rank's parameters live (a pipeline rank's other stages stay on the meta device)."""
        first = next(self.parameters())
        return next((p.device for p in self.parameters() if not p.is_meta), first.device)

    def prefix(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Condition prefix (B, P, width) from text states (B, P, text_dim) or class ids (B,); samples with
        drop=True get the learned null prefix instead (classifier-free guidance)."""
        if self.cfg.cond == "text":
            if cond.dim() != 3 or cond.shape[1:] != (self.cfg.text_len, self.cfg.text_dim):
                raise ValueError(f"text condition must be (B, {self.cfg.text_len}, {self.cfg.text_dim}), "
                                 f"got {tuple(cond.shape)}")
            x = self.cond_proj(cond.to(self.cond_proj.weight.dtype))
        else:
            if cond.dim() != 1:
                raise ValueError(f"class condition must be (B,) class ids, got {tuple(cond.shape)}")
            x = self.class_embed(cond.long())[:, None]
        if drop is not None:
            x = torch.where(drop.view(-1, 1, 1), self.null_prefix.expand_as(x).to(x.dtype), x)
        return x

    def key_keep(self, cond: torch.Tensor, drop: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """(B, length) bool, False at the text prefix's padding positions (the text encoder's zero states), so no
        token attends to padding; None for the class condition. A dropped sample's null prefix is all real, and
        position 0 (the encoder's [CLS]) is always kept. Never asks the data whether anything is padded: that
        would be a host-device sync per forward on GPU (and cannot run on the meta device)."""
        if self.cfg.cond != "text":
            return None
        pad = (cond == 0).all(-1)
        pad[:, 0] = False
        if drop is not None:
            pad &= ~drop.bool().view(-1, 1)
        return torch.cat([~pad, pad.new_ones(pad.shape[0], length - pad.shape[1])], dim=1)

    @staticmethod
    def masked_keys(mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """`mask` ((L, L), or (B, L, L), bool) with padding keys removed: (B, 1, L, L); (1|B, 1, L, L) unchanged
        when `keep` is None."""
        mask = mask[None, None] if mask.dim() == 2 else mask[:, None]
        return mask if keep is None else mask & keep[:, None, None, :]

    def embed_video(self, features: torch.Tensor, lt: LayoutTensors, lo: int, hi: int) -> torch.Tensor:
        """Video tokens [lo, hi) (video coordinates): projected features + scale embedding, SOS on frame 0 scale 0."""
        x = self.input_proj(features.to(self.input_proj.weight.dtype)) + self.scale_embed(lt.scale_ids[lo:hi])
        s0, s1 = max(lt.sos.start, lo), min(lt.sos.stop, hi)
        if s0 < s1:
            x = x.clone()
            x[:, s0 - lo:s1 - lo] = self.sos_embed + self.scale_embed.weight[0]
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, width) -> (B, N, d, 2) bit logits."""
        return self.head(self.norm(h)).view(*h.shape[:2], self.latent_dim, 2)

    # -- full sequence ---------------------------------------------------------------------------------------
    def forward(self, cond: torch.Tensor, features: torch.Tensor, layout: SequenceLayout,
                visibility: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bit logits (B, L_video, d, 2) for every video token, under the layout's block-causal rule with the
        Random Frame Mask's `visibility` (B, T, T) when given (`attention_mask`). `mask`: an explicit dense
        (L, L) / (B, L, L) bool mask instead (sdpa only; tests). With a `sequence_slice` (context parallel) the
        logits of the video tokens in this rank's slice only."""
        lt = self.tensors(layout)
        n_video = layout.length - layout.prefix_len
        if features.shape[1:] != (n_video, self.feature_dim):
            raise ValueError(f"features must be (B, {n_video}, {self.feature_dim}) for this layout, "
                             f"got {tuple(features.shape)}")
        x = torch.cat([self.prefix(cond, drop), self.embed_video(features, lt, 0, n_video)], dim=1)
        keep = self.key_keep(cond, drop, layout.length)
        if mask is None:
            mask = self.attention_mask(layout, x.shape[0], visibility, keep)
        else:
            if self.cfg.attention != "sdpa" or visibility is not None:
                raise ValueError("an explicit dense mask needs videoar.attention=sdpa and no visibility table")
            mask = self.masked_keys(mask, keep)
        rotation, P = lt.rotation, layout.prefix_len
        if self.sequence_slice is not None:  # context parallel: this rank's tokens (attention sees them all)
            sl = self.sequence_slice
            x, rotation, P = x[:, sl], rotation[sl], max(0, P - sl.start)
        x = self.run_blocks(self.blocks, x, rotation, mask)
        return self.logits(x[:, P:])

    def attention_mask(self, layout: SequenceLayout, batch: int, visibility: torch.Tensor | None,
                       keep: torch.Tensor | None):
        """The full-sequence attention mask for `videoar.attention`: sdpa gets a dense bool (1|B, 1, L, L) tensor
        (cached per layout without a visibility table), flex a `SparseMask` (no L x L tensor)."""
        device = self.device
        if self.cfg.attention == "flex":
            return block_mask(layout, batch, visibility, keep, device)
        dense = layout_mask(layout, device) if visibility is None else block_causal_mask(layout, visibility, device)
        return self.masked_keys(dense, keep)

    # -- the parallel plan and the pipeline-stage pieces (parallel/ applies them, common/parallel_plan.py) ------
    def parallel_plan(self) -> ParallelPlan:
        """Per block: QKV and SwiGLU gate/up column-parallel (heads split), attention output and SwiGLU down
        row-parallel; QK-norm weights are shared by all heads. Prefix and input embeddings live on the first
        pipeline stage, the final norm and the bitwise head on the last."""
        cfg = self.cfg
        return ParallelPlan(
            blocks="blocks", column_parallel=("attn.qkv", "mlp.gate", "mlp.up"), row_parallel=("attn.proj", "mlp.down"),
            tp_shared=("attn.q_norm", "attn.k_norm"),
            tp_divisible=(("videoar.heads", cfg.heads), ("the MLP width", cfg.mlp_hidden)), attention="attn",
            heads=cfg.heads,
            first_stage=("cond_proj", "class_embed", "null_prefix", "sos_embed", "scale_embed", "input_proj"),
            last_stage=("norm", "head"), no_weight_decay=("embed",), hidden_size=cfg.width)

    def stage_input(self, layout: SequenceLayout, features, cond, drop, visibility
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden, visibility, key keep): the small float tables (B, T, T) and (B, L) travel down the pipeline,
        each stage builds its attention mask from them (never an L x L tensor between stages)."""
        lt = self.tensors(layout)
        keep = self.key_keep(cond, drop, layout.length)
        keep = torch.ones(features.shape[0], layout.length, device=features.device) if keep is None else keep
        return torch.cat([self.prefix(cond, drop.bool()), self.embed_video(features, lt, 0, features.shape[1])],
                         dim=1), visibility, keep.float()

    def stage_blocks(self, layout: SequenceLayout, blocks, x: torch.Tensor, visibility: torch.Tensor,
                     keep: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask(layout, x.shape[0], visibility.bool(), keep.bool())
        return self.run_blocks(blocks, x, self.tensors(layout).rotation, mask)

    def stage_output(self, layout: SequenceLayout, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x[:, layout.prefix_len:])

    def run_blocks(self, blocks, x: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full-sequence pass through `blocks`; with `checkpoint_blocks` each block is recomputed in backward."""
        for blk in blocks:
            if self.checkpoint_blocks and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, rotation, mask, use_reentrant=False)
            else:
                x = blk(x, rotation, mask)
        return x

    # -- one block at a time (sampling) ------------------------------------------------------------------------
    def new_cache(self, batch: int, layout: SequenceLayout, window: int = 0) -> KVCache:
        """A cache for `layout`; `window` > 0 keeps only the last `window` history frames (the trained frame
        window), so its size does not grow with the number of frames."""
        p = next(self.parameters())
        heads = self.blocks[0].attn.qkv.weight.shape[0] // (3 * self.cfg.head_dim)  # this rank's heads under tp
        return KVCache(len(self.blocks), batch, heads, layout.length, self.cfg.head_dim, p.dtype, p.device,
                       layout.prefix_len, layout.tokens_per_frame, window)

    def forward_block(self, block: Block, features: torch.Tensor, layout: SequenceLayout, cache: KVCache,
                      cond: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, h*w, d, 2) of one block, attending to the cache; the first block also runs the prefix
        (pass `cond`). Blocks must come in layout order. Everything cached is visible to the block (its own scale
        bidirectionally), so no mask is built beyond the prefix's and the text padding's."""
        lt, P = self.tensors(layout), layout.prefix_len
        lo, hi = block.start - P, block.end - P
        x = self.embed_video(features, lt, lo, hi)
        start, mask = block.start, None
        if cache.length == 0:
            if cond is None:
                raise ValueError("the first block needs the condition (cond=...)")
            x, start = torch.cat([self.prefix(cond, drop), x], dim=1), 0
            keep = self.key_keep(cond, drop, P)
            if keep is not None:
                cache.key_keep = torch.cat([keep, keep.new_ones(keep.shape[0], cache.capacity - P)], dim=1)
            mask = torch.ones(block.end, block.end, dtype=torch.bool, device=x.device)
            mask[:P, P:] = False  # prefix tokens see only the prefix
        if cache.length != start:
            raise ValueError(f"block ({block.frame}, {block.scale}) starts at token {start}, cache holds {cache.length}")
        if block.scale == 0:
            cache.begin_frame()
        if cache.key_keep is not None:
            keep = cache.key_keep[:, :cache.stored + x.shape[1]]
            mask = self.masked_keys(mask, keep) if mask is not None else keep[:, None, None, :]
        rotation = lt.rotation[start:block.end]
        for i, blk in enumerate(self.blocks):
            x = blk(x, rotation, mask, cache, i)
        cache.commit(x.shape[1])
        return self.logits(x[:, block.start - start:])
