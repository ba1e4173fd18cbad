"""Layouts the libraries cannot run are refused at start-up with the reason, never discovered as a hang."""

from __future__ import annotations

import os

import pytest

from common.validation import ConfigError
from common.job_config import ParallelConfig
from parallel.checkpoint_format import rank_of, source_ranks
from parallel.deepspeed_engine import deepspeed_config
from parallel.topology import SINGLE, ensure_rendezvous_env, init_topology
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


def test_world_size_must_divide_by_tp_times_pp_times_cp(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is not divisible by parallel.tp x pp x cp = 2 x 1 x 1"):
        init_topology(ParallelConfig(tp=2))
    with pytest.raises(ValueError, match=r"tp x pp x cp = 1 x 1 x 2"):
        init_topology(ParallelConfig(cp=2))


def test_cp_with_a_pipeline_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="parallel.cp: cp=2 runs with pp=1 only"):
        ParallelConfig(cp=2, pp=2)
    assert ParallelConfig(cp=2, zero_stage=2).cp == 2


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


def test_srun_started_ranks_get_a_rendezvous_address(monkeypatch):
    """Ranks started by srun directly (no torchrun, no jobs.launch) rendezvous at the launch node on a port
    derived from the job id; an explicit MASTER_ADDR/MASTER_PORT wins."""
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    ensure_rendezvous_env(3, 8)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.1.2.3", str(20000 + 123456 % 20000))
    monkeypatch.setenv("MASTER_ADDR", "head")
    ensure_rendezvous_env(3, 8)
    assert os.environ["MASTER_ADDR"] == "head"


def test_deepspeed_accumulates_and_communicates_gradients_in_fp32():
    cfg = load_config(None, TINY + ["parallel.zero_stage=2", "videoar_train.precision=bf16"])
    ds = deepspeed_config(cfg.parallel, cfg.videoar_train, SINGLE, 8, 2, "cuda", 64)
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    cfg = load_config(None, TINY + ["parallel.zero_stage=1", "parallel.grad_accum_dtype=bf16"])
    ds = deepspeed_config(cfg.parallel, cfg.videoar_train, SINGLE, 8, 2, "cuda", 64)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["communication_data_type"] == "fp32"
    with pytest.raises(ConfigError, match=r"parallel\.grad_accum_dtype"):
        load_config(None, TINY + ["parallel.grad_accum_dtype=fp16"])
