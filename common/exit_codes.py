"""The exit codes and signals the job scripts, the launcher and the trainer agree on (stdlib only: the launcher
imports this and nothing heavy, so it catches a preemption signal within milliseconds of starting)."""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 3  # the sbatch script requeues the job when the trainer exits with this
EXIT_FAILED = 4  # what jobs.launch returns for a rank that failed with a lower code (1, 2) or died by a signal
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # preemption: SLURM's --signal=USR1@grace, or a plain termination
