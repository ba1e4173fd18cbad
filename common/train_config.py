"""Training sections of the shared config: tokenizer and VideoAR training, and the curriculum's stages."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from common.precision import PRECISIONS
from common.validation import ConfigError, check, check_choice

SCALE_LOSS_WEIGHTS = ("none", "sqrt_area")  # videoar_train.scale_loss_weight (models/objective.py)


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
    # this stage's videoar_train.motion_loss_weight (unset: that one): e.g. a strong weight in a cheap low-res stage
    # where motion is learned, a light one at full resolution where it costs the frames' detail
    motion_loss_weight: float | None = None
    # Joint image-video training (the paper's stages I/II): `image_batch` of the `global_batch` samples of every
    # step are images (frames = 1) at `image_resolution` with the scale schedule `image_scales` (defaults: the
    # stage's own); the rest are `frames`-long clips. 0 = video only; = global_batch: images only.
    image_batch: int = 0
    image_resolution: list[int] | None = None
    image_scales: list[int] | None = None
    image_scales_w: list[int] | None = None
    # > 0: the micro-batch is set by tokens instead: the most samples per forward whose sequences (prefix
    # included) fit this many tokens and that divide every part's per-rank share of the global batch
    # (`trainer/curriculum.py` resolve_micro_batches); `micro_batch` is then ignored
    micro_batch_tokens: int = 0

    def __post_init__(self) -> None:
        p = f"curriculum[{self.name}]"
        check(self.until_step >= 1, f"{p}.until_step", f"must be >= 1, got {self.until_step}")
        check(len(self.resolution) == 2, f"{p}.resolution", f"must be [height, width], got {list(self.resolution)}")
        check(self.frames >= 1, f"{p}.frames", f"must be >= 1, got {self.frames}")
        check(len(self.scales) >= 1 and list(self.scales) == sorted(self.scales), f"{p}.scales",
              f"must be a non-decreasing list, got {list(self.scales)}")
        if self.scales_w is not None:
            check(len(self.scales_w) == len(self.scales), f"{p}.scales_w", "must have as many entries as scales")
        check(self.micro_batch_tokens >= 0, f"{p}.micro_batch_tokens", f"must be >= 0, got {self.micro_batch_tokens}")
        per = self.micro_batch if not self.micro_batch_tokens else 1  # resolved against the token budget later
        check(self.global_batch >= 1 and self.micro_batch >= 1 and self.global_batch % per == 0,
              f"{p}.global_batch", f"must be a positive multiple of micro_batch ({self.micro_batch}), "
              f"got {self.global_batch}")
        for name in ("flip_start", "flip_end"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"{p}.{name}", f"must be in [0, 1], got {v}")
        check(0.0 <= self.p_mask < 1.0, f"{p}.p_mask", f"must be in [0, 1), got {self.p_mask}")
        check(self.window >= 0, f"{p}.window", f"must be >= 0, got {self.window}")
        check(self.motion_loss_weight is None or self.motion_loss_weight > 0, f"{p}.motion_loss_weight",
              f"must be > 0 (or unset), got {self.motion_loss_weight}")
        check(0 <= self.image_batch <= self.global_batch and self.image_batch % per == 0,
              f"{p}.image_batch", f"must be a multiple of micro_batch ({self.micro_batch}) in [0, global_batch="
              f"{self.global_batch}], got {self.image_batch}")
        if self.image_resolution is not None:
            check(len(self.image_resolution) == 2, f"{p}.image_resolution",
                  f"must be [height, width], got {list(self.image_resolution)}")
        if self.image_scales is not None:
            check(len(self.image_scales) >= 1 and list(self.image_scales) == sorted(self.image_scales),
                  f"{p}.image_scales", f"must be a non-decreasing list, got {list(self.image_scales)}")
        if self.image_scales_w is not None:
            check(len(self.image_scales_w) == len(self.image_scales or self.scales), f"{p}.image_scales_w",
                  "must have as many entries as image_scales")

    @property
    def sizes(self) -> list[tuple[int, int]]:
        cols = self.scales if self.scales_w is None else self.scales_w
        return [(int(h), int(w)) for h, w in zip(self.scales, cols)]

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.micro_batch

    def parts(self) -> list["StageConfig"]:
        """What one step of this stage trains on, each part a video-only stage of its own share of the global
        batch: the clips (named as the stage) and the images (`<name>-images`, frames = 1), whichever is non-empty.
        Everything per shape (data, latent cache, layout, quantizer sizes) is the part's."""
        out = []
        if self.global_batch > self.image_batch:
            out.append(replace(self, global_batch=self.global_batch - self.image_batch, image_batch=0,
                               image_resolution=None, image_scales=None, image_scales_w=None))
        if self.image_batch:
            scales = self.image_scales or self.scales
            own = self.image_scales_w is not None or self.image_scales is not None
            cols = self.image_scales_w if own else self.scales_w
            out.append(replace(self, name=f"{self.name}-images", global_batch=self.image_batch, image_batch=0,
                               frames=1, resolution=list(self.image_resolution or self.resolution),
                               scales=list(scales), scales_w=None if cols is None else list(cols),
                               image_resolution=None, image_scales=None, image_scales_w=None, p_mask=0.0, window=0))
        return out


@dataclass
class TokenizerTrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 4  # clips (random data.frames-long windows) per step
    lr: float = 1e-3  # tokenizer AdamW peak learning rate (linear warm-up, cosine decay)
    warmup_steps: int = 10  # linear learning-rate warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay on conv kernels (none on norms and biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # tokenizer AdamW betas
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    l1_weight: float = 1.0  # weight of mean |x^ - x|
    l2_weight: float = 1.0  # weight of mean (x^ - x)^2
    commit_weight: float = 0.25  # weight of the quantizer's commitment loss
    entropy_weight: float = 0.01  # weight of the quantizer's entropy penalty
    log_every: int = 10  # training losses to metrics.jsonl every this many steps
    eval_every: int = 100  # held-out evaluation every this many steps (and at the end)
    ckpt_every: int = 100  # checkpoint every this many steps (and at the end)
    # Eq. 4's optional terms (models/tokenizer_losses.py); at their defaults the loss is l1 + l2 + commit + entropy
    # and the run is exactly the one without them.
    gan_weight: float = 0.0  # base weight of the hinge generator loss of a causal 3D discriminator; 0 = no GAN
    gan_start_step: int = 0  # the discriminator trains, and the generator loss applies, only after this step
    adaptive_gan_weight: bool = True  # gan_weight * ||grad rec|| / (||grad G|| + 1e-4) at the decoder's last conv
    disc_lr: float = 2e-4  # discriminator AdamW learning rate (constant; tokenizer_train.grad_clip applies too)
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # discriminator AdamW betas
    disc_channels: int = 16  # width of the discriminator's first layer (doubled per layer, at most 8x)
    disc_layers: int = 3  # stride-2 causal conv layers: one logit per frame and (H/2^n x W/2^n) patch
    lecam_weight: float = 0.001  # LeCAM regularization weight in the discriminator loss (MAGVIT-v2: 0.001)
    lecam_decay: float = 0.99  # EMA decay of the mean real / fake discriminator outputs LeCAM anchors to
    perceptual_weight: float = 0.0  # weight of the perceptual feature distance; 0 = off (needs perceptual_net)
    perceptual_net: str = ""  # TorchScript file: frames (N,3,H,W) in [-1,1] -> features (tensor or list); none ships
    perceptual_distance: str = "l2"  # l2 | l1: mean squared / absolute feature difference
    # fp32 | bf16 | auto (bf16 where it is fast: CUDA, a CPU with AMX; common/precision.py): autocast of the encoder
    # and decoder convs; the quantizer and the losses stay fp32
    precision: str = "fp32"
    # nested scale dropout: the probability that a clip of a step is decoded from a random proper prefix of the
    # scales (first k of K, k uniform in 1..K-1) and that coarse reconstruction is what its loss sees, so the coarse
    # scales learn to place what matters (a small object) instead of leaving it to the finest ones; 0 = off
    scale_dropout: float = 0.0
    # Inflation (DESIGN §3.1): a 2D image tokenizer checkpoint dir (tokenizer.time_kernel=1,
    # tokenizer.temporal_compression=1, otherwise the same tokenizer/quantizer) loaded into the 3D one before step 1;
    # "" = train from scratch
    init_from: str = ""
    init_mode: str = "zero"  # zero: the 3D kernels' earlier time slices are 0 (a frame's 2D result exactly) | random:
    #                          small random values (the paper's)

    def __post_init__(self) -> None:
        p = "tokenizer_train"
        for name in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "disc_channels", "disc_layers"):
            check(getattr(self, name) >= 1, f"{p}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        for name in ("betas", "disc_betas"):
            v = getattr(self, name)
            check(len(v) == 2 and all(0 <= b < 1 for b in v), f"{p}.{name}", f"must be two numbers in [0, 1), got "
                  f"{list(v)}")
        check(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0 (0 disables)")
        for name in ("gan_weight", "gan_start_step", "lecam_weight", "perceptual_weight"):
            check(getattr(self, name) >= 0, f"{p}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.disc_lr > 0, f"{p}.disc_lr", f"must be > 0, got {self.disc_lr}")
        check(0 <= self.lecam_decay < 1, f"{p}.lecam_decay", f"must be in [0, 1), got {self.lecam_decay}")
        check(self.perceptual_weight == 0 or bool(self.perceptual_net), f"{p}.perceptual_net",
              f"perceptual_weight={self.perceptual_weight} needs a TorchScript feature network path (none ships)")
        check_choice(f"{p}.perceptual_distance", self.perceptual_distance, ("l2", "l1"))
        check_choice(f"{p}.init_mode", self.init_mode, ("zero", "random"))  # models/tokenizer.py inflate_from_2d
        check_choice(f"{p}.precision", self.precision, PRECISIONS)
        check(0 <= self.scale_dropout < 1, f"{p}.scale_dropout", f"must be in [0, 1), got {self.scale_dropout}")


@dataclass
class VideoARTrainConfig:
    tokenizer_ckpt: str = "runs/demo/tokenizer/checkpoint"  # frozen tokenizer that pre-encodes the clips
    steps: int = 200  # only without a `curriculum`: one stage at data.resolution / data.frames / quantizer.scales
    lr: float = 1e-4  # peak LR of the warm-up + cosine schedule (the paper's, Appendix A)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the curriculum's last step
    warmup_steps: int = 20
    weight_decay: float = 0.05  # none on norms, biases, embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto: bf16 where it is fast (CUDA, AMX CPU; common/precision.py)
    flip_p_min: float = 0.0  # CFEC p_min (DESIGN §3.6); p_max comes from the curriculum
    flip_delta: float = 0.01  # CFEC per-frame increase of the flip-ratio bounds; 0 = the same bounds for every frame
    # CFEC error inheritance: a frame's first-scale ratio is drawn from U(max(lo, previous frame's final ratio), hi);
    # false = U(lo, hi) at every scale (the time-dependent bounds stay). Corruption itself is off with p_max = 0
    # (curriculum flip_start = flip_end = 0).
    flip_inherit: bool = True
    scale_loss_weight: str = "none"  # none | sqrt_area: coarse-scale tokens weigh sqrt(H*W / (h_k*w_k)) (Infinity)
    # Weight (times the above) of scales 1..motion_loss_scales of every latent frame after the first, where a frame's
    # motion is decided: few tokens, so without it the model copies the previous frame unshifted (measured on the
    # demo; models/objective.py scale_loss_weights). 1 = off.
    motion_loss_weight: float = 1.0
    motion_loss_scales: int = 2
    # Weight of scales 0..motion_loss_scales of the first latent frame, where a text-to-video sample decides with no
    # history whether and where its object is. 1 = off.
    first_frame_loss_weight: float = 1.0
    log_every: int = 10
    ckpt_every: int = 100  # also at every stage switch and at the end
    keep_last: int = 3  # committed checkpoints kept
    resume: bool = True  # continue from the newest committed checkpoint in <run.dir>/videoar/checkpoints
    async_save: bool = False  # periodic checkpoints written by a background thread (ZeRO-0 engine only)
    max_nonfinite_steps: int = 5  # a step with non-finite gradients is skipped; this many in a row stop the run
    sample_ledger: bool = False  # each rank appends the sample keys of every step to samples/rank-XXXXX.jsonl
    eval_every: int = 0  # held-out bit loss/accuracy every this many steps and at the end (trainer/evaluate.py); 0 = off
    eval_samples: int = 0  # at most this many held-out samples per evaluation; 0 = all
    quality_eval: bool = False  # at every stage end, rank 0 samples the held-out captions from the checkpoint just
    #                             written and logs quality/* (caption colour/shape/direction/presence; trainer/quality.py)
    quality_samples: int = 16  # held-out captions sampled per quality evaluation (distinct ones)

    def __post_init__(self) -> None:
        p = "videoar_train"
        for name in ("steps", "log_every", "ckpt_every", "keep_last", "max_nonfinite_steps"):
            check(getattr(self, name) >= 1, f"{p}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, f"{p}.lr/min_lr_ratio", "need lr > 0, ratio in [0, 1]")
        check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        check(self.quality_samples >= 1, f"{p}.quality_samples", f"must be >= 1, got {self.quality_samples}")
        check(self.eval_every >= 0 and self.eval_samples >= 0, f"{p}.eval_every/eval_samples", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas",
              f"must be two numbers in [0, 1), got {list(self.betas)}")
        check(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0 (0 disables)")
        check_choice(f"{p}.precision", self.precision, PRECISIONS)
        check_choice(f"{p}.scale_loss_weight", self.scale_loss_weight, SCALE_LOSS_WEIGHTS)
        check(self.motion_loss_weight > 0 and self.motion_loss_scales >= 1, f"{p}.motion_loss_weight/_scales",
              f"need weight > 0 and scales >= 1, got {self.motion_loss_weight}, {self.motion_loss_scales}")
        check(self.first_frame_loss_weight > 0, f"{p}.first_frame_loss_weight",
              f"must be > 0, got {self.first_frame_loss_weight}")
        check(0 <= self.flip_p_min <= 1 and self.flip_delta >= 0, f"{p}.flip_p_min/flip_delta",
              "need p_min in [0, 1] and delta >= 0")


def check_stage_order(stages: list[StageConfig]) -> None:
    """At least one stage, with strictly increasing `until_step`."""
    if not stages:
        raise ConfigError("curriculum: needs at least one stage")
    ends = [s.until_step for s in stages]
    if ends != sorted(set(ends)):
        raise ConfigError(f"curriculum: until_step must strictly increase across stages, got {ends}")
