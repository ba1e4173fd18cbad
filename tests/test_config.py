"""The config system: presets, overrides, validation errors that name the field, round trips, CLI behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_presets_load_with_paper_like_ucf101():
    demo = load_config(ROOT / "configs/demo.yaml")
    assert demo.run.device == "cpu" and demo.quantizer.sizes[-1] == (8, 8)
    ucf = load_config(ROOT / "configs/ucf101.yaml")
    assert ucf.data.frames == 17 and ucf.data.resolution == [128, 128]
    assert ucf.tokenizer.temporal_compression == 4 and ucf.tokenizer.spatial_compression == 16
    assert [h for h, _ in ucf.quantizer.sizes] == [1, 2, 3, 4, 6, 8]
    assert sum(h * w for h, w in ucf.quantizer.sizes) == 130  # tokens per latent frame (DESIGN §3.2)


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(ROOT / "configs/demo.yaml", ["tokenizer_train.steps=7", "tokenizer_train.lr=0.5",
                                                   "data.resolution=[16,16]", "quantizer.scales=[1,2,4]",
                                                   "curriculum=[]"])
    assert cfg.tokenizer_train.steps == 7 and isinstance(cfg.tokenizer_train.steps, int)
    assert cfg.tokenizer_train.lr == 0.5 and cfg.data.resolution == [16, 16]


@pytest.mark.parametrize("override, expected", [
    ("quantizer.down=cubic", r"quantizer\.down: 'cubic' is not one of \['area', 'bilinear', 'bicubic', 'nearest'\]"),
    ("run.device=tpu", r"run\.device: 'tpu' is not one of \['cpu', 'cuda'\]"),
    ("tokenizer.latent_dim=many", r"tokenizer\.latent_dim: .*could not be converted to Integer"),
    ("tokenizer.no_such_key=1", r"tokenizer\.no_such_key: Key 'no_such_key' not in 'TokenizerConfig'"),
    ("data.resolution=[30,32]", r"data\.resolution: 30x32 must be divisible by tokenizer\.spatial_compression=4"),
    ("quantizer.scales=[1,2,4]", r"quantizer\.scales: the last scale must equal the latent grid 8x8"),
    ("data.frames=10", r"data\.frames: must be 1 \+ k \* tokenizer\.temporal_compression \(4\), got 10"),
    ("tokenizer.channel_mult=[1,2,4]", r"tokenizer\.channel_mult: needs log2\(spatial_compression\) = 2 entries"),
    ("data.synth_world=hard", r"data\.synth_world: 'hard' is not one of \['easy', 'medium', 'full'\]"),
    ("steps=3", r"overrides must look like key\.sub=value|steps: Key 'steps'"),
    ("videoar.rope=spiral", r"videoar\.rope: 'spiral' is not one of \['temporal', 'flat'\]"),
    ("videoar_train.flip_inherit=maybe", r"videoar_train\.flip_inherit: Value 'maybe' is not a valid bool"),
])
def test_errors_name_the_field_and_allowed_values(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(ROOT / "configs/demo.yaml", [override])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_saved_config_round_trips(tmp_path, suffix):
    cfg = load_config(ROOT / "configs/ucf101.yaml", ["run.seed=5"])
    path = tmp_path / f"resolved{suffix}"
    save_config(cfg, path)
    again = load_config(path) if suffix == ".yaml" else config_from_dict(__import__("json").loads(path.read_text()))
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_cli_help_lists_keys_and_bad_values_exit_2():
    help_ = subprocess.run([sys.executable, "-m", "trainer.train_tokenizer", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "tokenizer_train.steps=" in help_.stdout and "--config" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "trainer.train_tokenizer", "quantizer.up=sideways"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "quantizer.up: 'sideways' is not one of" in bad.stderr


@pytest.mark.parametrize("preset, sizes", [("small", (12, 512, 8)), ("L", (24, 1536, 12)), ("XL", (32, 2048, 16))])
def test_a_model_preset_from_the_cli_sets_the_sizes_and_explicit_sizes_win(preset, sizes):
    v = load_config(None, [f"videoar.preset={preset}"]).videoar
    assert (v.depth, v.width, v.heads) == sizes
    v = load_config(None, [f"videoar.preset={preset}", "videoar.depth=2"]).videoar
    assert (v.depth, v.width, v.heads) == (2, *sizes[1:])
    with pytest.raises(ConfigError, match=r"videoar\.depth: must be >= 1 \(or come from a preset\)"):
        load_config(None, ["videoar.preset=custom"])


@pytest.mark.parametrize("preset, sizes, paper", [("L", (24, 1536, 12), 926e6), ("XL", (32, 2048, 16), 2.0e9),
                                                   ("4B", (36, 2560, 32), 4.0e9)])
def test_large_presets_have_the_papers_parameter_counts(preset, sizes, paper):
    """Counting rule (common/model_config.py PRESETS): every parameter of VideoAR with the preset's defaults (text
    prefix from 384-wide states, 16-bit latents), built on the meta device; the paper's figure within 3%."""
    import torch

    from models.videoar import VideoAR

    v = load_config(None, [f"videoar.preset={preset}"]).videoar
    assert (v.depth, v.width, v.heads) == sizes
    with torch.device("meta"):
        count = sum(t.numel() for t in VideoAR(v, 16).parameters())
    assert abs(count / paper - 1) < 0.03, (preset, count)


@pytest.mark.parametrize("name, sizes, world, tp", [("videoar_l", (24, 1536, 12), 32, 1),
                                                    ("videoar_xl", (32, 2048, 16), 64, 2)])
def test_cluster_presets_build_the_paper_shapes_on_valid_layouts(name, sizes, world, tp):
    """The L/XL presets: model shape and parameter count (built on the meta device: no memory), a parallel layout
    that divides the world, batches that divide over data parallelism, and an sbatch script that renders."""
    import torch

    from jobs.slurm import render_sbatch
    from models.videoar import VideoAR

    cfg = load_config(ROOT / f"configs/{name}.yaml")
    v, p = cfg.videoar, cfg.parallel
    assert (v.depth, v.width, v.heads) == sizes and cfg.videoar_train.precision == "bf16"
    with torch.device("meta"):
        model = VideoAR(v, cfg.tokenizer.latent_dim)
    w = v.width  # per block: qkv + proj, SwiGLU gate/up/down, two RMSNorms, q/k norms
    per_block = 4 * w * w + 3 * w * v.mlp_hidden + 2 * w + 2 * v.head_dim
    assert sum(t.numel() for t in model.blocks.parameters()) == v.depth * per_block
    assert cfg.slurm.nodes * cfg.slurm.procs_per_node == world and p.tp == tp
    assert world % (p.tp * p.pp) == 0 and v.heads % p.tp == 0 and cfg.slurm.gpus_per_node % p.tp == 0
    dp = world // (p.tp * p.pp)
    for stage in cfg.curriculum:
        for part in stage.parts():  # clips and images of a joint stage each divide over the dp ranks
            assert part.global_batch % (stage.micro_batch * dp) == 0, part.name
    # the paper's three stages: images + low-res video, higher-res images + video, long high-res video only
    assert [s.name for s in cfg.curriculum] == ["I", "II", "III"]
    shapes = [[(p.frames, *p.resolution) for p in s.parts()] for s in cfg.curriculum]
    assert shapes == [[(17, 128, 128), (1, 256, 256)], [(17, 256, 256), (1, 384, 384)], [(49, 256, 256)]]
    assert cfg.curriculum[2].flip_end == 0.25 and cfg.curriculum[2].p_mask > 0
    script = render_sbatch(cfg, f"runs/{name}/slurm/config.yaml")
    assert f"--nodes={cfg.slurm.nodes}" in script and f"--nproc {cfg.slurm.procs_per_node}" in script


def test_one_curriculum_stage_is_overridable_by_index():
    cfg = load_config(ROOT / "configs/demo.yaml", ["curriculum.1.until_step=1900", "curriculum.0.flip_end=0.2",
                                                   "videoar_train.lr=0.01"])
    assert cfg.curriculum[1].until_step == 1900 and isinstance(cfg.curriculum[1].until_step, int)
    assert cfg.curriculum[0].flip_end == 0.2 and cfg.curriculum[0].until_step == 1000 and cfg.videoar_train.lr == 0.01
    with pytest.raises(ConfigError, match=r"curriculum\.7\.until_step: no such list element"):
        load_config(ROOT / "configs/demo.yaml", ["curriculum.7.until_step=3"])
    with pytest.raises(ConfigError, match=r"curriculum\[low-res\]\.until_step: must be >= 1"):
        load_config(ROOT / "configs/demo.yaml", ["curriculum.0.until_step=0"])
