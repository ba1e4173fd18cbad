"""The one config system, shared by every entry point: typed dataclasses <- YAML preset <- `key.sub=value` CLI overrides (OmegaConf).

Every entry point builds its parser with `config_arg_parser` and gets a validated `Config` from
`config_from_args`; the resolved config is written into the run directory with `save_config`. Each section
validates itself in `__post_init__`; `Config.__post_init__` checks what spans sections (e.g. resolution vs
latent grid). Errors are `ConfigError`s naming the dotted field and the allowed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.atomic import atomic_write_text
from common.job_config import ParallelConfig, PreprocessConfig, SlurmConfig
from common.model_config import PRESET_SIZES, QuantizerConfig, SamplingConfig, TokenizerConfig, VideoARConfig
from common.train_config import StageConfig, TokenizerTrainConfig, VideoARTrainConfig, check_stage_order
from common.validation import ConfigError, check, check_choice


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # everything a run writes goes under here
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    tensorboard: bool = True  # TensorBoard event files beside metrics.jsonl
    metrics_port: int = 0  # Prometheus endpoint on 127.0.0.1 from rank 0: 0 = any free port, -1 = off
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = measured at start-up with a GEMM

    def __post_init__(self) -> None:
        check_choice("run.device", self.device, ("cpu", "cuda"))
        check(self.threads >= 0, "run.threads", f"must be >= 0, got {self.threads}")
        check(-1 <= self.metrics_port <= 65535, "run.metrics_port", f"must be -1 (off), 0 (any) or a port, got "
              f"{self.metrics_port}")
        check(self.peak_flops >= 0, "run.peak_flops", f"must be >= 0 (0 = measure), got {self.peak_flops}")


@dataclass
class DataConfig:
    clips_dir: str = "runs/demo/clips"  # a folder of .mp4 clips (+ optional .json/.txt captions)
    # clips_dir (and preprocess.input) hold one sub-folder of videos per class, as UCF-101 does: the class id is the
    # folder's index among the sorted folder names, the caption the folder name (unless a sidecar gives one)
    class_folders: bool = False
    synth_clips: int = 24  # the demo generates this many synthetic clips into clips_dir when it is empty
    synth_frames: int = 33  # length of each generated clip
    synth_world: str = "full"  # easy | medium | full: what the generated clips contain (data_pipeline/synth.py)
    frames: int = 9  # frames per training clip: 1 + k * tokenizer.temporal_compression
    resolution: list[int] = field(default_factory=lambda: [64, 64])  # [height, width] after resize + center crop
    fps: float = 8.0
    heldout_clips: int = 2  # the last N clips (sorted by name) are held out for evaluation
    shards: str = ""  # VideoAR trains from these preprocessed shards (dir or s3://...); "" = encode clips_dir
    eval_shards: str = ""  # held-out preprocessed shards for videoar_train.eval_every when training reads `shards`
    #                        ("" with `shards` set: no held-out evaluation, said once at start-up)
    endpoint_url: str = ""  # S3 endpoint (e.g. http://127.0.0.1:9000); "" = AWS_ENDPOINT_URL / AWS config
    loader_workers: int = 4  # threads fetching samples (ranged reads) from shards

    def __post_init__(self) -> None:
        check(len(self.resolution) == 2 and all(r >= 8 for r in self.resolution), "data.resolution",
              f"must be [height, width] with both >= 8, got {list(self.resolution)}")
        check(self.frames >= 1, "data.frames", f"must be >= 1, got {self.frames}")
        check(self.synth_frames >= self.frames, "data.synth_frames",
              f"must be >= data.frames ({self.frames}), got {self.synth_frames}")
        check_choice("data.synth_world", self.synth_world, ("easy", "medium", "full"))
        check(self.heldout_clips >= 1, "data.heldout_clips", f"must be >= 1, got {self.heldout_clips}")
        check(self.fps > 0, "data.fps", f"must be > 0, got {self.fps}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    tokenizer_train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    videoar: VideoARConfig = field(default_factory=VideoARConfig)
    videoar_train: VideoARTrainConfig = field(default_factory=VideoARTrainConfig)
    curriculum: list[StageConfig] = field(default_factory=list)  # empty: one stage from data/quantizer
    sample: SamplingConfig = field(default_factory=SamplingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        f, tau = self.tokenizer.spatial_compression, self.tokenizer.temporal_compression
        h, w = self.data.resolution
        check(h % f == 0 and w % f == 0, "data.resolution",
              f"{h}x{w} must be divisible by tokenizer.spatial_compression={f}")
        grid = (h // f, w // f)
        check(self.quantizer.sizes[-1] == grid, "quantizer.scales",
              f"the last scale must equal the latent grid {grid[0]}x{grid[1]} (resolution {h}x{w} / f={f}), "
              f"got {self.quantizer.sizes[-1][0]}x{self.quantizer.sizes[-1][1]}")
        check((self.data.frames - 1) % tau == 0, "data.frames",
              f"must be 1 + k * tokenizer.temporal_compression ({tau}), got {self.data.frames}")
        if not self.curriculum:
            self.curriculum = [StageConfig(name="main", until_step=self.videoar_train.steps,
                                           resolution=list(self.data.resolution), frames=self.data.frames,
                                           scales=list(self.quantizer.scales), scales_w=self.quantizer.scales_w)]
        check_stage_order(self.curriculum)
        for stage in self.curriculum:
            for s in stage.parts():  # the clips and the images (frames = 1) of a joint stage
                p, pre = f"curriculum[{stage.name}]", "image_" if s.name != stage.name else ""
                sh, sw = s.resolution
                check(sh % f == 0 and sw % f == 0, f"{p}.{pre}resolution",
                      f"{sh}x{sw} must be divisible by tokenizer.spatial_compression={f}")
                check(s.sizes[-1] == (sh // f, sw // f), f"{p}.{pre}scales",
                      f"the last scale must equal the latent grid {sh // f}x{sw // f}, got {s.sizes[-1]}")
                check((s.frames - 1) % tau == 0, f"{p}.frames", f"must be 1 + k * {tau}, got {s.frames}")
                check(len(s.scales) <= min(len(self.quantizer.scales), self.videoar.max_scales), f"{p}.{pre}scales",
                      f"at most {min(len(self.quantizer.scales), self.videoar.max_scales)} scales (quantizer.scales "
                      f"and videoar.max_scales), got {len(s.scales)}")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)


def _build(layers: list[Any], source: str | Path | None = None, items: list[str] = ()) -> Config:
    """Merge OmegaConf layers into a validated Config; OmegaConf's errors become ConfigErrors naming the key.
    `items`: `list.N.key=value` overrides of list elements (e.g. curriculum.1.until_step=900), applied last."""
    try:
        schema = OmegaConf.structured(Config)
        # the schema's nested defaults come from instances whose __post_init__ already filled the model sizes from
        # the default preset; unset them so the preset chosen in the YAML/CLI decides (explicit sizes still win)
        for name in PRESET_SIZES:
            schema.videoar[name] = None
        merged = OmegaConf.merge(schema, *layers)
        for item in items:
            key, value = item.split("=", 1)
            if OmegaConf.select(merged, key, default=_MISSING) is _MISSING:
                raise ConfigError(f"{key}: no such list element or key (override {item!r})")
            OmegaConf.update(merged, key, yaml.safe_load(value), merge=False)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}" + (f" (in {source})" if source else "")) from None


_MISSING = object()
_LIST_ITEM = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\.\d+(\.|=)")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- overrides (`key.sub=value`; `curriculum.1.key=value` for one list element),
    validated into a `Config`."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
    items = [o for o in overrides if _LIST_ITEM.match(o)]  # e.g. curriculum.1.until_step=900
    try:
        file_layer = [OmegaConf.load(path)] if path is not None else []
        override_layer = OmegaConf.from_dotlist([o for o in overrides if o not in items])
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"{path or 'overrides'}: {str(e).splitlines()[0]}") from None
    return _build(file_layer + [override_layer], path, items)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `config_to_dict` (e.g. from a checkpoint's JSON), validated."""
    return _build([OmegaConf.create(d)])


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (or JSON for a .json path), atomically."""
    path = Path(path)
    if path.suffix == ".json":
        atomic_write_text(path, json.dumps(config_to_dict(cfg), indent=2, sort_keys=True))
    else:
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def config_arg_parser(description: str, default_config: str | None = "configs/demo.yaml") -> argparse.ArgumentParser:
    """An argparse parser with `--config FILE` and trailing `key.sub=value` overrides, documented in --help."""
    keys = "\n".join(f"  {k}" for k in _leaf_keys(OmegaConf.to_container(OmegaConf.structured(Config))))
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are OmegaConf dotlist entries, e.g. tokenizer_train.steps=20 data.resolution=[32,32].\n"
               f"Config keys (see common/*config.py for meanings and defaults):\n{keys}")
    parser.add_argument("--config", default=default_config, help=f"YAML preset (default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Config:
    """The validated config; with `parser`, a bad value exits with status 2 and the error instead of a traceback."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        if parser is None:
            raise
        parser.error(str(e))


def _leaf_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={v}")
    return out
