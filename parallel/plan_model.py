"""The capacity planner's arithmetic (parallel/plan.py): per-GPU memory and step time of one VideoAR training
layout, from the config dataclasses and plain numbers only (`parallel` imports no model; the FLOP count is
common/flops_model.py's, the trainer's MFU formula).

Memory per GPU, in bytes, of the most loaded rank (pipeline stage 0: the embeddings and the most blocks):
- parameters, gradients, optimizer states: the ZeRO paper's accounting (Rajbhandari et al. 2020, Table 1) over
  the ZeRO group n = dp x cp. DeepSpeed bf16 (ZeRO >= 1 on CUDA): 2 bytes a parameter, 2 a gradient, K = 12 of
  optimizer state (fp32 master copy, Adam m and v); ZeRO-1 splits the optimizer states over n, ZeRO-2 the
  gradients too, ZeRO-3 the parameters too. `parallel.grad_accum_dtype=fp32` (the default) adds a 4-byte
  gradient copy of what the stage keeps: ZeRO-1's BF16_Optimizer keeps fp32 gradients of the whole model (+4 Psi,
  measured by benchmarks/zero_memory.py), ZeRO-2/3 of their partition. ZeRO-0 is the torch engine: fp32 weights
  under autocast, 4 + 4 + 8 bytes. In fp32 (CPU) DeepSpeed keeps 4 + 4 and K = 12 (its fp32 partition copy + m, v).
- activations, per transformer block and token of the rank (B x L / cp tokens), in elements (`block_elements`):
  4 w full width (block input, both norm outputs, the mid-block residual), 9 w / tp split by heads (qkv, the
  QK-normed q and k, their RoPE outputs, the attention output and its re-laid copy for the projection; + w / tp of
  exchanged values under cp) and 4 h / tp of SwiGLU (gate, SiLU, up, their product). With activation
  checkpointing only the block input stays per block, plus one block recomputed in backward. Pipeline stage 0
  holds pp micro-batches in flight (1F1B; every micro-batch with GPipe). Outside the blocks: the final norm's
  input and output and the bit logits' loss (2 w + 8 d per video token).
- attention workspace: the block-sparse / flash kernels keep O(L), not O(L^2) (models/block_sparse.py): the
  backward's dq, dk, dv of one block plus the row log-sum-exps; the CPU `tiled` kernel also a query tile's scores
  against all keys; dense SDPA the L x L bool mask and its float copy.
- backward transients of one block (the flowing gradient and SwiGLU's gradients) and buffers (RoPE tables, DeepSpeed's
  reduce and all-gather buckets of width^2 elements, parallel/deepspeed_engine.py).

Step time = (compute + TP + CP + PP point-to-point) x (1 + pipeline bubble) + DP, with compute = the step's
FLOPs (x 4/3 with activation checkpointing: the forward again) / (tp pp cp dp) / (peak x mfu), each
communication = bytes one GPU sends / its link's bandwidth (NVLink inside a node, InfiniBand across nodes; rank
order tp-cp-dp-pp), bubble = (pp - 1) / micro-batches. DP is not assumed to overlap the backward (an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass

from common import flops_model
from common.gpu_specs import GPUSpec
from common.model_config import VideoARConfig

TILE = 128  # the block-sparse kernels' query tile (models/block_sparse.py)


@dataclass(frozen=True)
class Shape:
    """One part of a curriculum stage: `global_batch` sequences of one shape per optimizer step."""
    name: str
    prefix_len: int
    num_frames: int  # latent frames
    sizes: tuple[tuple[int, int], ...]
    global_batch: int
    window: int = 0

    @property
    def length(self) -> int:
        return flops_model.sequence_length(self.prefix_len, self.num_frames, self.sizes)

    @property
    def video_tokens(self) -> int:
        return self.length - self.prefix_len


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    zero: int = 0
    ac: bool = False  # activation checkpointing
    micro_batch: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class Precision:
    """`bf16`: the cluster presets (DeepSpeed bf16 for ZeRO >= 1, autocast for ZeRO-0); `fp32`: CPU runs."""
    mode: str = "bf16"
    grad_accum: str = "fp32"  # parallel.grad_accum_dtype
    attention: str = "flex"  # flex (fused, GPU) | tiled (CPU block-sparse) | sdpa (dense L x L mask)
    pp_schedule: str = "1f1b"

    @property
    def act_bytes(self) -> int:
        return 2 if self.mode == "bf16" else 4


def block_params(cfg: VideoARConfig, tp: int = 1) -> int:
    """Parameters of one transformer block on a tp rank: qkv, proj, gate, up, down split; norms replicated."""
    w, h = cfg.width, cfg.mlp_hidden
    qk_norms = 2 * cfg.head_dim if cfg.qk_norm else 0
    return (4 * w * w + 3 * w * h) // tp + 2 * w + qk_norms


def outer_params(cfg: VideoARConfig, latent_dim: int) -> tuple[int, int]:
    """(first-stage, last-stage) parameters outside the blocks: condition, null prefix, SOS, scale embedding and
    input projection; the final norm and the bitwise head."""
    w = cfg.width
    cond = cfg.text_dim * w + w if cfg.cond == "text" else cfg.num_classes * w
    first = cond + cfg.prefix_len * w + w + cfg.max_scales * w + cfg.feature_dim(latent_dim) * w + w
    return first, w + w * 2 * latent_dim + 2 * latent_dim


def blocks_per_stage(depth: int, pp: int) -> list[int]:
    base, extra = divmod(depth, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def rank_params(cfg: VideoARConfig, latent_dim: int, tp: int = 1, pp: int = 1) -> int:
    """Parameters a rank of pipeline stage 0 holds (the most: embeddings and the first, largest block share);
    with pp = 1 the whole model (divided by tp where tensor parallelism splits it)."""
    first, last = outer_params(cfg, latent_dim)
    stage0 = blocks_per_stage(cfg.depth, pp)[0] * block_params(cfg, tp) + first
    return stage0 + (last if pp == 1 else 0)


def model_params(cfg: VideoARConfig, latent_dim: int) -> int:
    return rank_params(cfg, latent_dim)


def state_bytes(psi: int, lay: Layout, prec: Precision) -> dict[str, float]:
    """Parameters, gradients and optimizer states per rank for `psi` parameters on the rank (ZeRO paper)."""
    n, z = lay.dp * lay.cp, lay.zero
    if z == 0:
        p, g, k = 4, 4, 8
    else:
        p, g, k = (2, 2, 12) if prec.mode == "bf16" else (4, 4, 12)
    params = p * psi / (n if z == 3 else 1)
    grads = g * psi / (n if z >= 2 else 1)
    if z >= 1 and prec.mode == "bf16" and prec.grad_accum == "fp32":
        grads += 4 * psi / (n if z >= 2 else 1)
    return {"parameters": params, "gradients": grads, "optimizer": k * psi / (n if z >= 1 else 1)}


def block_elements(cfg: VideoARConfig, tp: int, cp: int) -> int:
    """Activation elements one block saves for backward per token of the rank (see the module docstring)."""
    w, h = cfg.width, cfg.mlp_hidden
    return 4 * w + (9 * w + (w if cp > 1 else 0) + 4 * h) // tp


def activation_bytes(cfg: VideoARConfig, latent_dim: int, shape: Shape, lay: Layout, prec: Precision
                     ) -> dict[str, float]:
    """Activations, attention workspace and backward transients of one rank at its peak (start of backward)."""
    tokens = lay.micro_batch * shape.length / lay.cp
    a, w, h, tp = prec.act_bytes, cfg.width, cfg.mlp_hidden, lay.tp
    layers = blocks_per_stage(cfg.depth, lay.pp)[0]
    in_flight = lay.pp if prec.pp_schedule == "1f1b" else 10**9
    per_block = block_elements(cfg, tp, lay.cp) * tokens * a
    if lay.ac:
        kept = layers * w * tokens * a + per_block
    else:
        kept = layers * per_block
    outside = (2 * w + 8 * latent_dim) * lay.micro_batch * shape.video_tokens / lay.cp * a if lay.pp == 1 else 0
    heads = cfg.heads // tp
    workspace = 3 * w // tp * tokens * a + 4 * heads * tokens * 4  # dq, dk, dv + lse and norm statistics
    if prec.attention == "tiled":
        workspace += 3 * TILE * shape.length * (heads // lay.cp) * 4 * lay.micro_batch
    elif prec.attention == "sdpa":
        workspace += shape.length**2 * (1 + 4 * lay.micro_batch)
    transient = (2 * w + 3 * h // tp) * tokens * a
    return {"activations": kept * min(in_flight, _micro_steps(shape, lay)) + outside,
            "attention_workspace": workspace, "transients": transient}


def _micro_steps(shape: Shape, lay: Layout) -> int:
    return max(1, shape.global_batch // (lay.dp * lay.micro_batch))


def buffer_bytes(cfg: VideoARConfig, shape: Shape, lay: Layout, prec: Precision) -> float:
    """RoPE tables (complex rotation + angles, fp32) and DeepSpeed's two communication buckets."""
    rope = 6 * shape.length * cfg.head_dim
    buckets = 2 * cfg.width**2 * (4 if prec.mode == "fp32" or prec.grad_accum == "fp32" else 2) if lay.zero else 0
    return rope + buckets


def memory(cfg: VideoARConfig, latent_dim: int, shapes: list[Shape], lay: Layout, prec: Precision
           ) -> dict[str, float]:
    """Per-GPU peak bytes by kind; activation terms of the stage's largest part (one part runs at a time)."""
    psi = rank_params(cfg, latent_dim, lay.tp, lay.pp)
    out = state_bytes(psi, lay, prec)
    acts = [activation_bytes(cfg, latent_dim, s, lay, prec) for s in shapes]
    big = max(range(len(shapes)), key=lambda i: sum(acts[i].values()))
    out.update(acts[big])
    out["buffers"] = buffer_bytes(cfg, shapes[big], lay, prec)
    out["total"] = sum(out.values())
    return out


def comm_bytes(cfg: VideoARConfig, latent_dim: int, shape: Shape, lay: Layout, prec: Precision
               ) -> dict[str, float]:
    """Bytes one GPU sends per optimizer step for one part of a stage, by parallel dimension (ring all-reduce
    2 (n-1)/n of the payload, reduce-scatter and all-gather (n-1)/n each, all-to-all (n-1)/n)."""
    micro = shape.global_batch / (lay.dp * lay.micro_batch)  # micro-batches per rank per step
    layers = blocks_per_stage(cfg.depth, lay.pp)[0]
    forwards = 2 if lay.ac else 1  # the forward (+ its recomputation in backward)
    passes = forwards + 1
    a, tokens = prec.act_bytes, lay.micro_batch * shape.length / lay.cp
    tp = lay.tp
    # per block: the 2 row-parallel outputs (attention proj, MLP down) each forward, the input gradients of the
    # 3 column-parallel layers (qkv, gate, up: megatron-core reduces each on its own) in backward
    tp_reduces = 2 * forwards + 3
    tp_bytes = tp_reduces * layers * tokens * cfg.width * a * 2 * (tp - 1) / tp * micro
    cp_bytes = 4 * passes * layers * tokens * cfg.width / tp * a * (lay.cp - 1) / lay.cp * micro
    pp_bytes = 2 * tokens * cfg.width * a * micro if lay.pp > 1 else 0
    return {"tp": tp_bytes, "cp": cp_bytes, "pp": pp_bytes}


def dp_bytes(cfg: VideoARConfig, latent_dim: int, lay: Layout, prec: Precision, micro: float = 1,
             reduce_scatter: bool = True) -> float:
    """Gradient reduction (+ ZeRO's parameter all-gathers) per step over the dp x cp group of one rank, `micro`
    micro-batches a step. The torch engine and ZeRO-1 reduce once a step (all-reduce; ZeRO-1 reduce-scatter), ZeRO-2/3
    on every micro-batch's backward (DeepSpeed reduces into the partition as gradients arrive): reduce-scatter on
    NCCL, an all-reduce of the bucket on gloo (`reduce_scatter=False`). Then the updated parameters are all-gathered
    (ZeRO-3: in the forward and again in the backward)."""
    n, psi = lay.dp * lay.cp, rank_params(cfg, latent_dim, lay.tp, lay.pp)
    if n == 1:
        return 0.0
    frac = (n - 1) / n
    if lay.zero == 0:
        return 2 * frac * psi * 4
    g = 4 if prec.mode == "fp32" or prec.grad_accum == "fp32" else 2
    p = 2 if prec.mode == "bf16" else 4
    reductions = micro if lay.zero >= 2 else 1
    reduce = reductions * frac * psi * g * (1 if reduce_scatter else 2)
    return reduce + frac * psi * p * (2 * micro if lay.zero == 3 else 1)


def bandwidths(lay: Layout, gpu: GPUSpec) -> dict[str, float]:
    """Per dimension, the link its group spans: rank order tp-cp-dp-pp, so a group of stride s and size n stays
    inside a node when s x n <= gpus per node."""
    def link(span: int) -> float:
        return gpu.intra_node_bw if span <= gpu.gpus_per_node else gpu.inter_node_bw
    return {"tp": link(lay.tp), "cp": link(lay.tp * lay.cp), "dp": link(lay.tp * lay.cp * lay.dp),
            "pp": link(lay.gpus)}


def step_flops(cfg: VideoARConfig, latent_dim: int, shapes: list[Shape], attention: str = "flex") -> int:
    """Model FLOPs of one optimizer step (every part's global batch), common/flops_model.py's count: useful
    attention pairs for the block-sparse kernels, L x L for dense SDPA."""
    kind = "dense" if attention == "sdpa" else "useful"
    return sum(flops_model.train_step_flops(cfg, latent_dim, s.prefix_len, s.num_frames, s.sizes, s.global_batch,
                                            kind, s.window) for s in shapes)


def step_time(cfg: VideoARConfig, latent_dim: int, shapes: list[Shape], lay: Layout, prec: Precision,
              gpu: GPUSpec, mfu: float) -> dict[str, float]:
    """Seconds per optimizer step by term (see the module docstring)."""
    flops = step_flops(cfg, latent_dim, shapes, prec.attention) * (4 / 3 if lay.ac else 1)
    compute = flops / lay.gpus / (gpu.bf16_flops * mfu)
    bw = bandwidths(lay, gpu)
    comm = {k: 0.0 for k in ("tp", "cp", "pp")}
    micro = 0.0
    for s in shapes:
        for k, v in comm_bytes(cfg, latent_dim, s, lay, prec).items():
            comm[k] += v / bw[k]
        micro += s.global_batch / (lay.dp * lay.micro_batch)
    bubble = (lay.pp - 1) / micro if lay.pp > 1 else 0.0
    dp = dp_bytes(cfg, latent_dim, lay, prec, micro) / bw["dp"]
    body = compute + comm["tp"] + comm["cp"] + comm["pp"]
    out = {"compute": compute, "tp": comm["tp"], "cp": comm["cp"], "pp": comm["pp"], "bubble": body * bubble,
           "dp": dp}
    out["total"] = body * (1 + bubble) + dp
    out["mfu"] = step_flops(cfg, latent_dim, shapes, prec.attention) / lay.gpus / gpu.bf16_flops / out["total"]
    return out
