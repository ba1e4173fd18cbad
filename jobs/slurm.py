"""Submit VideoAR training to SLURM, with preemption and requeue (DESIGN §7).

    python -m jobs.slurm submit --config configs/demo.yaml [slurm.nodes=4 slurm.gpus_per_node=8 ...] [--dry-run]
    python -m jobs.slurm status JOBID
    python -m jobs.slurm cancel JOBID

`submit` writes the resolved config and the rendered sbatch script into <run.dir>/slurm/ (read it: it is
what runs), then calls `sbatch`. The script starts one `jobs.launch` per node with `srun`; the launchers
rendezvous on the first node of the allocation. `--signal=USR1@<grace>` asks the trainers to checkpoint before
the time limit (or on preemption); when they exit with EXIT_PREEMPTED the script requeues the job (`--requeue`),
and the restarted job resumes from the newest committed checkpoint in the same run directory.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from common.config import Config, config_arg_parser, load_config, save_config
from trainer.preemption import EXIT_PREEMPTED


def render_sbatch(cfg: Config, config_path: str | Path) -> str:
    s, run_dir = cfg.slurm, cfg.run_dir.resolve()
    lines = ["#!/bin/bash", f"#SBATCH --job-name={s.job_name}", f"#SBATCH --nodes={s.nodes}",
             "#SBATCH --ntasks-per-node=1"]
    if s.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    if s.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={s.cpus_per_task}")
    for opt, value in (("partition", s.partition), ("account", s.account), ("time", s.time)):
        if value:
            lines.append(f"#SBATCH --{opt}={value}")
    lines += [f"#SBATCH --output={run_dir}/slurm/%x-%j.out", f"#SBATCH --signal=USR1@{s.signal_grace_s}",
              "#SBATCH --requeue", "#SBATCH --open-mode=append"]
    lines += [f"#SBATCH {opt}" for opt in s.extra_sbatch]
    launcher = [shlex.quote(sys.executable), "-m", "jobs.launch", "--nproc", str(s.procs_per_node), "--nnodes", "$SLURM_NNODES",
                "--master-addr", "$HEAD", "--master-port", str(s.master_port)]
    if s.threads_per_proc:
        launcher += ["--threads", str(s.threads_per_proc)]
    launcher += ["--", "--config", shlex.quote(str(Path(config_path).resolve()))]
    cpus = f" --cpus-per-task={s.cpus_per_task}" if s.cpus_per_task else ""
    lines += [
        "",
        "# The first node of the allocation hosts the rendezvous of every node's launcher. Each launcher reads its",
        "# node rank from its own $SLURM_NODEID (set per task by srun; written here it would be the batch host's 0).",
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"cd {shlex.quote(str(Path.cwd().resolve()))}",
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST, head $HEAD"',
        "# Rendezvous for ranks that srun starts directly, without jobs.launch (parallel/topology.py reads these).",
        'export MASTER_ADDR="$HEAD" MASTER_PORT=' + str(s.master_port),
        "# srun: one launcher per node; SLURM's USR1 reaches them, they pass it to the trainers. No",
        "# --kill-on-bad-exit: a preempted launcher exits 3 while the others still write their checkpoint shards;",
        "# srun returns the highest code, and a crash exits > 3 (jobs.launch), so only a clean preemption requeues.",
        "# Slurm >= 22.05 does not pass --cpus-per-task from sbatch to srun: say it again.",
        f"srun --ntasks-per-node=1{cpus} {' '.join(launcher)}",
        "rc=$?",
        f"if [ $rc -eq {EXIT_PREEMPTED} ]; then",
        '    echo "preempted: checkpoint written, requeueing $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def write_job(cfg: Config) -> tuple[Path, Path]:
    """Resolved config + sbatch script in <run.dir>/slurm/."""
    out = cfg.run_dir / "slurm"
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    save_config(cfg, config_path)
    script = out / "job.sbatch"
    script.write_text(render_sbatch(cfg, config_path))
    return script, config_path


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} not found: is this a SLURM login node?") from None
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip()


def submit(script: Path) -> int:
    out = _run(["sbatch", "--parsable", str(script)])
    return int(out.split(";")[0])


def status(job_id: int) -> str:
    """The job's state (PENDING, RUNNING, COMPLETED, ...) from `scontrol show job`."""
    out = _run(["scontrol", "show", "job", str(job_id)])
    for token in out.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    raise RuntimeError(f"scontrol printed no JobState for job {job_id}")


def cancel(job_id: int) -> None:
    _run(["scancel", str(job_id)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="python -m jobs.slurm", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("command", choices=("submit", "status", "cancel"), help="what to do (each has its own --help)")
    # --help prints the help and exits 0; no or an unknown command exits 2 with the usage; the subcommands'
    # own --help goes to their parsers below
    parsed = top.parse_args(argv[:1])
    command, rest = parsed.command, argv[1:]
    if command == "submit":
        parser = config_arg_parser("Render and submit the sbatch script (see python -m jobs.slurm).")
        parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
        args = parser.parse_args(rest)
        try:
            cfg = load_config(args.config, args.overrides)
        except ValueError as e:
            parser.error(str(e))
        if args.dry_run:
            print(render_sbatch(cfg, cfg.run_dir / "slurm" / "config.yaml"))
            return 0
        script, _ = write_job(cfg)
        job = submit(script)
        print(f"submitted job {job}: {script}\nlogs: {cfg.run_dir / 'slurm'}/{cfg.slurm.job_name}-{job}.out")
        return 0
    parser = argparse.ArgumentParser(prog=f"jobs.slurm {command}")
    parser.add_argument("job_id", type=int)
    args = parser.parse_args(rest)
    if command == "status":
        print(status(args.job_id))
    else:
        cancel(args.job_id)
        print(f"cancelled {args.job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
