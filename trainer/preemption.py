"""Preemption: on SIGUSR1 (SLURM's `--signal`) or SIGTERM the trainer finishes its current step, all ranks agree
(a max-reduce of the flag after every step, so nobody saves alone or hangs in a collective), a checkpoint is
saved, and the process exits with `EXIT_PREEMPTED` so the job script requeues it; the next start resumes from
the newest committed checkpoint in the same run directory.
"""

from __future__ import annotations

import logging
import signal

from common.exit_codes import EXIT_FAILED, EXIT_PREEMPTED, SIGNALS
from parallel.collectives import any_rank

__all__ = ["EXIT_FAILED", "EXIT_PREEMPTED", "SIGNALS", "PreemptionFlag"]

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        """Catch SIGUSR1/SIGTERM (main thread only; elsewhere, e.g. a Ray worker thread, the flag stays unset)."""
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: checkpointing after the current step", self.signal_name)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks each step)."""
        return any_rank(self.requested)
