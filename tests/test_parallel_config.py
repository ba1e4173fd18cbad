"""Layouts the libraries cannot run are refused at start-up with the reason, never discovered as a hang."""

from __future__ import annotations

import pytest

from common.validation import ConfigError
from common.job_config import ParallelConfig
from parallel.checkpoint_format import rank_of, source_ranks
from parallel.topology import init_topology
from tests.conftest import TINY
from common.config import load_config


def test_zero_with_pipeline_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage: ZeRO stage 2 with pp=2 is not supported"):
        load_config(None, TINY + ["parallel.pp=2", "parallel.zero_stage=2"])


def test_stage_split():
    assert ParallelConfig(pp=3).blocks_per_stage(8) == [3, 3, 2]
    assert ParallelConfig(pp=2, stage_blocks=[1, 3]).blocks_per_stage(4) == [1, 3]
    with pytest.raises(ConfigError, match="must sum to videoar.depth=5"):
        ParallelConfig(pp=2, stage_blocks=[1, 3]).blocks_per_stage(5)
    with pytest.raises(ConfigError, match="at least as many blocks"):
        ParallelConfig(pp=4).blocks_per_stage(3)


def test_world_size_must_divide_by_tp_times_pp(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is not divisible by parallel.tp x parallel.pp = 2 x 1"):
        init_topology(ParallelConfig(tp=2))


def test_slurm_env_is_read(monkeypatch):
    from parallel.topology import env_rank_world

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_rank_world() == (5, 8, 1)


def test_megatron_rank_order():
    """tp fastest, then dp, then pp: the ranks holding each parameter once are dp rank 0 of every stage."""
    layout = {"tp": 2, "pp": 2, "dp": 2}
    assert [rank_of(t, d, p, layout) for p in range(2) for d in range(2) for t in range(2)] == list(range(8))
    assert source_ranks(layout) == [[0, 1], [4, 5]]
