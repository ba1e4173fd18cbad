"""The sbatch script for a 4-node x 8-GPU run, checked line by line without running it."""

from __future__ import annotations

import re

from jobs.slurm import main, render_sbatch, write_job
from tests.conftest import TINY
from common.config import load_config


def test_four_nodes_of_eight_gpus(tmp_path):
    cfg = load_config(None, TINY + [f"run.dir={tmp_path}", "slurm.nodes=4", "slurm.gpus_per_node=8",
                                    "slurm.partition=gpu", "slurm.account=vid", "slurm.time=2-00:00:00",
                                    "slurm.signal_grace_s=300", "parallel.tp=2", "run.device=cuda"])
    script, config = write_job(cfg)
    text = script.read_text()
    assert text == render_sbatch(cfg, config)
    lines = text.splitlines()
    for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --partition=gpu", "#SBATCH --account=vid", "#SBATCH --time=2-00:00:00",
                     "#SBATCH --signal=USR1@300", "#SBATCH --requeue"):
        assert expected in lines, expected
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--ntasks-per-node=1" in srun  # one launcher per node ...
    assert "--nproc 8 --nnodes $SLURM_NNODES --master-addr $HEAD" in srun  # 8 ranks each
    assert "--node-rank" not in srun  # each launcher reads its own SLURM_NODEID; the batch shell's is always 0
    # the batch shell expands every $VAR of the srun line before the tasks exist: only values that are the same
    # on every node may appear there (a per-task one, e.g. SLURM_NODEID or SLURM_PROCID, would be node 0's)
    assert set(re.findall(r"\$\{?(\w+)", srun)) <= {"SLURM_NNODES", "HEAD"}, srun
    assert "--kill-on-bad-exit" not in srun  # a preempted node must not kill the others mid-checkpoint
    assert 'export MASTER_ADDR="$HEAD" MASTER_PORT=29500' in lines
    assert f"--config {config.resolve()}" in srun
    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines  # rendezvous: first node
    assert lines.index("rc=$?") > lines.index(srun)
    assert "if [ $rc -eq 3 ]; then" in lines and '    scontrol requeue "$SLURM_JOB_ID"' in lines
    saved = load_config(config)
    assert (saved.parallel.tp, saved.slurm.nodes) == (2, 4)


def test_dry_run_prints_and_submits_nothing(tmp_path, capsys):
    assert main(["submit", "--config", "configs/demo.yaml", f"run.dir={tmp_path}", "--dry-run"]) == 0
    assert "#SBATCH --requeue" in capsys.readouterr().out
    assert not (tmp_path / "slurm").exists()


def test_srun_repeats_cpus_per_task(tmp_path):
    """Slurm >= 22.05 does not hand sbatch's --cpus-per-task to srun: without it 8 trainers share one CPU."""
    cfg = load_config(None, TINY + [f"run.dir={tmp_path}", "slurm.cpus_per_task=12"])
    lines = render_sbatch(cfg, tmp_path / "c.yaml").splitlines()
    srun = next(line for line in lines if line.startswith("srun "))
    assert "#SBATCH --cpus-per-task=12" in lines and srun.startswith("srun --ntasks-per-node=1 --cpus-per-task=12 ")


FAKE_SRUN = """#!/bin/bash
# srun as SLURM runs it: one task per node, each with its own per-task variables (unlike the batch step's);
# `jobs.launch` is run with --dry-run so each task prints the ranks it would start
while [[ "$1" == --* ]]; do shift; done  # srun's own options
cmd=()
for a in "$@"; do cmd+=("$a"); [[ "$a" == "jobs.launch" ]] && cmd+=("--dry-run"); done
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=node$i "${cmd[@]}" || exit $?
done
"""
FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && for ((i = 0; i < SLURM_NNODES; i++)); do echo node$i; done
"""


def test_each_node_gets_its_own_node_rank_from_the_task_environment(tmp_path):
    """The rendered script runs under bash with batch-step variables (SLURM_NODEID=0, SLURMD_NODENAME=node0) and
    an srun that starts one task per node with per-task variables: every task must compute its own node rank
    (a variable expanded by the batch shell would give every node rank 0), so the 4 x 8 processes get the global
    ranks 0..31 once each, all with the first node as the rendezvous."""
    import json
    import os
    import subprocess

    cfg = load_config(None, TINY + [f"run.dir={tmp_path / 'run'}", "slurm.nodes=4", "slurm.gpus_per_node=8"])
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(cfg, tmp_path / "c.yaml"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    batch = {"SLURM_NNODES": "4", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURMD_NODENAME": "node0",
             "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[0-3]"}
    env = {**os.environ, **batch, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plans = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(plans) == 32
    assert sorted(int(p["RANK"]) for p in plans) == list(range(32))
    assert [int(p["NODE_RANK"]) for p in plans] == [i // 8 for i in range(32)]
    assert {(p["WORLD_SIZE"], p["MASTER_ADDR"], p["MASTER_PORT"]) for p in plans} == {("32", "node0", "29500")}
    assert all(p["args"][:2] == ["--config", str((tmp_path / "c.yaml").resolve())] for p in plans)
