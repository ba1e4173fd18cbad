"""The sbatch script for a 4-node x 8-GPU run, checked line by line without running it."""

from __future__ import annotations

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
