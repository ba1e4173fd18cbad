"""The config system: presets, overrides, validation errors that name the field, round trips, CLI behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config

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
                                                   "data.resolution=[32,32]", "quantizer.scales=[1,2,4]",
                                                   "curriculum=[]"])
    assert cfg.tokenizer_train.steps == 7 and isinstance(cfg.tokenizer_train.steps, int)
    assert cfg.tokenizer_train.lr == 0.5 and cfg.data.resolution == [32, 32]


@pytest.mark.parametrize("override, expected", [
    ("quantizer.down=cubic", r"quantizer\.down: 'cubic' is not one of \['area', 'bilinear', 'bicubic', 'nearest'\]"),
    ("run.device=tpu", r"run\.device: 'tpu' is not one of \['cpu', 'cuda'\]"),
    ("tokenizer.latent_dim=many", r"tokenizer\.latent_dim: .*could not be converted to Integer"),
    ("tokenizer.no_such_key=1", r"tokenizer\.no_such_key: Key 'no_such_key' not in 'TokenizerConfig'"),
    ("data.resolution=[60,64]", r"data\.resolution: 60x64 must be divisible by tokenizer\.spatial_compression=8"),
    ("quantizer.scales=[1,2,4]", r"quantizer\.scales: the last scale must equal the latent grid 8x8"),
    ("data.frames=10", r"data\.frames: must be 1 \+ k \* tokenizer\.temporal_compression \(4\), got 10"),
    ("tokenizer.channel_mult=[1,2]", r"tokenizer\.channel_mult: needs log2\(spatial_compression\) = 3 entries"),
    ("steps=3", r"overrides must look like key\.sub=value|steps: Key 'steps'"),
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
